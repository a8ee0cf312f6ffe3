"""Shared command-line plumbing: absl flags + ml_collections config files, one-line errors."""
from __future__ import annotations

import sys
from typing import Callable

from lmjax import allocator
from lmjax.errors import EXIT_USER_ERROR, run_cli


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


_NONE_VALUES = ("None", "null")


def _split_none_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """(argv without the --config.a.b=None overrides, their dotted keys).

  ml_collections parses an override by the field's current type, so a field that defaults
  to an int (checkpoint.every_steps) could not be set to None (its "off") from the command
  line; these overrides are applied after the config file loads.
  """
  rest, keys = [], []
  for arg in argv:
    key, _, value = arg.partition("=")
    if key.startswith("--config.") and value in _NONE_VALUES:
      keys.append(key[len("--config."):])
    else:
      rest.append(arg)
  return rest, keys


def _set_none(config, key: str) -> None:
  node, *path = config, *key.split(".")
  for i, name in enumerate(path):
    if not hasattr(node, "keys") or name not in node.keys():
      raise ValueError(f"--config.{key}=None: {'.'.join(path[:i + 1])} is not a config "
                       "field; check the spelling against the config file.")
    if i == len(path) - 1:
      with node.ignore_type():
        node[name] = None
    else:
      node = node[name]


def run_main(main: Callable, *, config_required: bool = False, workdir: bool = False) -> None:
  """Defines --config (a config file; --config.a.b=v overrides, v None or null sets a field
  to None) and --workdir, then runs main.

  Flag errors (an unknown --config.key, a bad value, a missing config file) become one line
  on stderr and exit status 2, like every other UserError. Before anything else, the process
  may re-execute itself once on mimalloc (lmjax/allocator.py says when and why).
  """
  allocator.maybe_reexec()  # a no-op where the module's own first statement did it
  # ml_collections reads the --config.* overrides from sys.argv itself.
  sys.argv, none_keys = _split_none_overrides(sys.argv)
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
      "config", None, "Config file (a .py with get_config()); override fields with "
      "--config.section.field=value.", lock_config=True)
  if workdir:
    flags.DEFINE_string("workdir", None, "Directory of the run (checkpoints, metrics).")
  flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() "
                    "(Cloud TPU pods and SLURM/GKE clusters detect their peers themselves).")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process "
                      "runs JAX cannot detect (e.g. several processes on localhost).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")

  def parse(argv):
    try:
      rest = flags.FLAGS(argv)
      if config_required and flags.FLAGS.config is None:
        raise flags.Error("--config is required, e.g. --config=experiments/configs/smoke.py")
      if flags.FLAGS.config is not None:
        flags.FLAGS.config.keys()  # config files load lazily: surface their errors here
      for key in none_keys:
        if flags.FLAGS.config is None:
          raise flags.Error(f"--config.{key}=None needs --config=<file> too.")
        _set_none(flags.FLAGS.config, key)
      return rest
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's input
      print(f"lmjax: error: {_one_line(e)}", file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)

  def quiet_main(argv):
    from absl import logging
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
      logging.set_verbosity(logging.WARNING)
    return run_cli(lambda a: (init_distributed(flags.FLAGS), main(a))[1], argv)

  app.run(quiet_main, flags_parser=parse)


def init_distributed(flag_values) -> None:
  """Joins a multi-process JAX run when asked; a no-op for a single process."""
  from lmjax.errors import ConfigError, require
  explicit = flag_values.coordinator_address is not None
  if not (explicit or flag_values.distributed):
    return
  import jax
  if explicit:
    require(flag_values.num_processes and flag_values.process_id is not None,
            "--coordinator_address needs --num_processes and --process_id too.", ConfigError)
    require(0 <= flag_values.process_id < flag_values.num_processes,
            f"--process_id={flag_values.process_id} must be in [0, --num_processes="
            f"{flag_values.num_processes}).", ConfigError)
  # CPU processes need a collectives backend to talk to each other (no effect on TPU/GPU).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address=flag_values.coordinator_address,
                               num_processes=flag_values.num_processes,
                               process_id=flag_values.process_id)
  else:
    jax.distributed.initialize()
