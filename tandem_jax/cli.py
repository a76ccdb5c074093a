"""What every ``python -m tandem_jax.<command>`` shares: quiet terminal logs, one-line user errors.

:func:`run` replaces ``absl.app.run``:

- **Logs.** The terminal shows the command's own lines and library records of WARNING and above; library INFO
  (orbax's checkpoint manager, absl, our own ``logging.info``) goes to ``<workdir>/logs/<command>.log`` when the
  command has a workdir. ``--verbosity`` (absl's flag: 0 = INFO, 1 = DEBUG) brings everything back to the terminal.
- **Errors.** A user error (a bad flag value, a missing or wrong workdir, input the library refuses with a
  ``ValueError``) prints ``error: <message>`` on one line to stderr and exits with code 2; with ``--verbosity=1`` it
  raises as usual (traceback). Anything else is an internal error and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Callable

from absl import app, flags
from absl import logging as absl_logging

EXIT_USER_ERROR = 2
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, app.UsageError, flags.Error)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class UserError(ValueError):
  """Bad input to a command line (what :func:`run` prints as one line)."""


def _verbosity_given() -> bool:
  return "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present


def verbose() -> bool:
  """True under ``--verbosity=1`` (or more): user errors show their traceback."""
  return _verbosity_given() and flags.FLAGS.verbosity >= 1


def configure_logging(log_file: str | None) -> None:
  """Library INFO to ``log_file`` (if given), WARNING and above to the terminal (everything with --verbosity)."""
  root = logging.getLogger()
  handler = absl_logging.get_absl_handler()
  if not _verbosity_given():
    root.setLevel(logging.INFO)  # records are made; each handler picks what it shows
    absl_logging.get_absl_logger().setLevel(logging.NOTSET)  # absl's records follow the root level
    handler.setLevel(logging.WARNING)
  if log_file:
    for h in list(root.handlers):  # one file handler per process, even if configured twice (tests)
      if getattr(h, "_tandem_jax_log", False):
        root.removeHandler(h)
        h.close()
    fh = _LazyFileHandler(log_file)
    fh._tandem_jax_log = True  # type: ignore[attr-defined]
    fh.setLevel(min(logging.INFO, root.level or logging.INFO))
    fh.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(fh)


class _LazyFileHandler(logging.FileHandler):
  """A FileHandler that creates its directory (and file) at the first record, not before: a command refused for a
  bad workdir leaves nothing behind."""

  def __init__(self, path: str):
    super().__init__(path, delay=True)

  def _open(self):
    os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
    return super()._open()


def log_file_for(command: str, workdir: str | None, must_exist: bool = False) -> str | None:
  """``<workdir>/logs/<command>.log``; None without a workdir (or, with ``must_exist``, when it does not exist)."""
  if not workdir:
    return None
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if must_exist and not os.path.isdir(workdir):
    return None
  return os.path.join(workdir, "logs", f"{command}.log")


def fail(message) -> None:
  """Prints ``error: message`` on one line (its lines joined) to stderr and exits with code 2."""
  text = str(message)
  if "Traceback (most recent call last)" in text:  # ml_collections puts the config file's traceback in its message
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = text.split("Traceback (most recent call last)")[0].split("\n")[0].rstrip(": ") + ": " + lines[-1]
  text = " ".join(text.split("\n")).strip() or type(message).__name__
  print(f"error: {text}", file=sys.stderr, flush=True)
  raise SystemExit(EXIT_USER_ERROR)


def wrap(main: Callable, command: str, workdir_flag: str | None = "workdir", reads_workdir: bool = False) -> Callable:
  """``main`` with the logging setup before it and user errors turned into one line + exit code 2.

  ``reads_workdir``: the command only reads the workdir (generate): it logs there only if the workdir exists."""
  def wrapped(argv):
    workdir = None
    if workdir_flag and workdir_flag in flags.FLAGS:
      workdir = flags.FLAGS[workdir_flag].value
    configure_logging(log_file_for(command, workdir, must_exist=reads_workdir))
    try:
      return main(argv)
    except USER_ERRORS as e:
      if verbose():
        raise
      fail(e)
  return wrapped


def parse_flags(argv):
  """absl's flag parsing with a bad flag reported as one line and exit code 2 (not absl's FATAL + usage)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    missing = re.search(r"Flag --(\w+) must have a value other than None", str(e))
    fail(f"--{missing.group(1)} is required" if missing else e)


def run(main: Callable, command: str, workdir_flag: str | None = "workdir", reads_workdir: bool = False) -> None:
  """``absl.app.run(main)`` with this module's conventions (see the module docstring). On a TPU VM the programs are
  compiled with sharding.TPU_XLA_FLAGS (set before jax starts libtpu; nothing changes elsewhere)."""
  from tandem_jax.sharding import set_tpu_flags
  set_tpu_flags()
  app.run(wrap(main, command, workdir_flag, reads_workdir), flags_parser=parse_flags)


def refuse_unused(method: str, applies: dict[str, Callable[[str], bool]]) -> None:
  """Raises UserError when a flag given on the command line does not apply to ``method``.

  ``applies`` maps flag name -> predicate on the method; only flags the user set (``present``) are checked.
  """
  bad = [name for name, ok in applies.items() if flags.FLAGS[name].present and not ok(method)]
  if bad:
    raise UserError(f"--{bad[0]} does not apply to --method={method}")
