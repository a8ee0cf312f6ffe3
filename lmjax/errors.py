"""User-facing errors: one clear line that names the problem and the fix.

Everything a user can get wrong (config, command line, data, checkpoint, manifest)
raises a `UserError`. Entry points wrap `main` in `run_cli`, which prints the
message as a single line and exits with status 2 instead of a traceback.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, NoReturn

EXIT_USER_ERROR = 2


class UserError(Exception):
  """Bad input. The message is one line: what is wrong, then how to fix it."""

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split()))  # always exactly one line


class ConfigError(UserError):
  """A config value is invalid or inconsistent."""


class DataError(UserError):
  """Input data is missing, empty or malformed."""


class CheckpointError(UserError):
  """A checkpoint or workdir cannot be used as asked."""


def require(cond: Any, message: str, error: type[UserError] = ConfigError) -> None:
  if not cond:
    raise error(message)


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  ok = ok and (value >= 0 if allow_zero else value > 0)
  bound = ">= 0" if allow_zero else "> 0"
  require(ok, f"{name}={value!r} is invalid: it must be a number {bound}.")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
  choices = tuple(choices)
  require(value in choices,
          f"{name}={value!r} is not a known option; choose one of {', '.join(map(repr, choices))}.")


def fail(message: str, error: type[UserError] = UserError) -> NoReturn:
  raise error(message)


def run_cli(main: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
  """Calls main; a UserError becomes one line on stderr and exit status 2."""
  try:
    return main(*args, **kwargs)
  except UserError as e:
    print(f"lmjax: error: {e}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
