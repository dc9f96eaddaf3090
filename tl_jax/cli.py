"""What every script shares: turning the library's errors into one clear line and an exit code."""

from __future__ import annotations

import gc
import logging
import os
import sys
import traceback
from typing import Callable

# Errors that describe bad input (files, flags, data). They carry a message written for the
# user, so a script prints it instead of a traceback. tl_jax's own errors (ConfigError,
# DataError, WeightsError, CheckpointError, ...) derive from ValueError or RuntimeError; one with
# an `exit_code` attribute exits with it (a diverged run: 3), the others with 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError)

# Set to 1 to see the traceback behind an `error: ...` line.
DEBUG_ENV = 'TL_JAX_DEBUG'


class Stopped(Exception):
  """A command stopped on request (a signal), its work saved: the message is the line to print, not
  an error, and `exit_code` the status (128 + the signal's number, as a shell reports it)."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


def _is_ours(error: BaseException) -> bool:
  return type(error).__module__.split('.')[0] == 'tl_jax' or isinstance(error, FileNotFoundError)


def _report(error: BaseException) -> int:
  """Prints `error` as one line on stderr (the traceback too under TL_JAX_DEBUG=1); its exit status."""
  if isinstance(error, Stopped):
    print(error, file=sys.stderr)
    return error.exit_code
  if isinstance(error, KeyboardInterrupt):
    print('interrupted', file=sys.stderr)
    return 130
  if os.environ.get(DEBUG_ENV):
    traceback.print_exception(error)
  print(f'error: {error}', file=sys.stderr)
  if not _is_ours(error) and not os.environ.get(DEBUG_ENV):
    # Not one of tl_jax's own messages: it may come from a library or a bug, so say how to see where.
    print(f'(raised as {type(error).__name__}; run with {DEBUG_ENV}=1 for the traceback)', file=sys.stderr)
  return getattr(error, 'exit_code', 2)


def _teardown_noise(unraisable) -> bool:
  """What a failed orbax read or write leaves behind, each with a traceback ('Exception ignored in
  ...'): its tensorstore operations still in flight finish into an event loop orbax has closed, and
  its coroutines cut short raise again when they are finalized, later or at interpreter shutdown."""
  error, source = unraisable.exc_value, getattr(unraisable, 'object', None)
  code = getattr(source, 'cr_code', None)
  return ((isinstance(error, RuntimeError) and str(error) == 'Event loop is closed') or
          (isinstance(error, ImportError) and 'Python is likely shutting down' in str(error)) or
          (code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename))


def _quiet_unraisable(previous: Callable) -> Callable:
  """A sys.unraisablehook that drops `_teardown_noise` and passes the rest to `previous`."""
  return lambda unraisable: None if _teardown_noise(unraisable) else previous(unraisable)


def run(main: Callable[[], int | None]) -> None:
  """Calls `main`; a user-facing error becomes `error: ...` on stderr and exit status 2 (or its
  `exit_code`), a `Stopped` its line and status, Ctrl-C outside a run `interrupted` and 130."""
  if not os.environ.get(DEBUG_ENV):
    # A failure of orbax (a damaged or unwritable checkpoint) is reported here in one line; orbax also
    # logs it as ERROR records with tracebacks from each of its background threads, and leaves the
    # noise `_teardown_noise` describes.
    logging.getLogger('absl').setLevel(logging.CRITICAL)
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
  status = None
  try:
    status = main()
  except (Stopped, KeyboardInterrupt, *USER_ERRORS) as e:
    status = _report(e)
  # Out of the except block the error and its traceback are freed, and with them the frames of
  # background work it interrupted (orbax's pending reads): collected now, while the interpreter
  # is whole, they close quietly; left to interpreter shutdown, each printed a traceback.
  gc.collect()
  sys.exit(status or 0)
