"""Shared command-line plumbing: absl flags + ml_collections config files, one-line errors."""
from __future__ import annotations

import sys
from typing import Callable

from lmjax.errors import EXIT_USER_ERROR, run_cli


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


def run_main(main: Callable, *, config_required: bool = False, workdir: bool = False) -> None:
  """Defines --config (a config file; --config.a.b=v overrides) and --workdir, then runs main.

  Flag errors (an unknown --config.key, a bad value, a missing config file) become one line
  on stderr and exit status 2, like every other UserError.
  """
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
      "config", None, "Config file (a .py with get_config()); override fields with "
      "--config.section.field=value.", lock_config=True)
  if workdir:
    flags.DEFINE_string("workdir", None, "Directory of the run (checkpoints, metrics).")

  def parse(argv):
    try:
      rest = flags.FLAGS(argv)
      if config_required and flags.FLAGS.config is None:
        raise flags.Error("--config is required, e.g. --config=experiments/configs/smoke.py")
      if flags.FLAGS.config is not None:
        flags.FLAGS.config.keys()  # config files load lazily: surface their errors here
      return rest
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's input
      print(f"lmjax: error: {_one_line(e)}", file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)

  def quiet_main(argv):
    from absl import logging
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
      logging.set_verbosity(logging.WARNING)
    return run_cli(main, argv)

  app.run(quiet_main, flags_parser=parse)
