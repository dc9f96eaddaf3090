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


def _orbax_code(code) -> bool:
  return f'{os.sep}orbax{os.sep}' in code.co_filename


def _teardown_noise(unraisable) -> bool:
  """What a failed orbax read or write leaves behind, each with a traceback ('Exception ignored in
  ...'): its tensorstore operations still in flight finish into an event loop orbax has closed, and
  its coroutines cut short raise again when they are finalized, later or at interpreter shutdown."""
  error, source = unraisable.exc_value, getattr(unraisable, 'object', None)
  code = getattr(source, 'cr_code', None)
  return ((isinstance(error, RuntimeError) and str(error) == 'Event loop is closed') or
          (isinstance(error, ImportError) and 'Python is likely shutting down' in str(error)) or
          (code is not None and _orbax_code(code)))


def _quiet_unraisable(previous: Callable) -> Callable:
  """A sys.unraisablehook that drops `_teardown_noise` and passes the rest to `previous`."""
  return lambda unraisable: None if _teardown_noise(unraisable) else previous(unraisable)


def _from_orbax(error: BaseException) -> bool:
  """Whether `error`, or one it was raised from, came out of orbax's (tensorstore's) reads or writes."""
  seen = error
  while seen is not None:
    if 'TensorStore' in str(seen) or 'OCDBT' in str(seen):
      return True
    frame = seen.__traceback__
    while frame is not None:
      if _orbax_code(frame.tb_frame.f_code):
        return True
      frame = frame.tb_next
    seen = seen.__cause__ or seen.__context__
  return False


class OrbaxTaskNoise(logging.Filter):
  """Drops asyncio's 'Task/Future exception was never retrieved' records for orbax's reads: when one
  read of a damaged checkpoint fails, orbax gathers the first error and the others' tasks fail
  unobserved; each is logged with its traceback when collected (how many depends on where the file
  was cut). The damage itself is reported in one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not (error is not None and 'never retrieved' in record.getMessage() and _from_orbax(error))


def quiet_library_noise() -> None:
  """Library logging that only repeats an error a script reports in one line: absl's ERROR records
  (orbax logs a failure from each of its threads), asyncio's unobserved orbax tasks, and the
  unraisable teardown noise `_teardown_noise` describes. Idempotent."""
  logging.getLogger('absl').setLevel(logging.CRITICAL)
  asyncio_logger = logging.getLogger('asyncio')
  if not any(isinstance(f, OrbaxTaskNoise) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(OrbaxTaskNoise())
  if not getattr(sys.unraisablehook, 'tl_jax_quiet', False):
    hook = _quiet_unraisable(sys.unraisablehook)
    hook.tl_jax_quiet = True
    sys.unraisablehook = hook


def run(main: Callable[[], int | None]) -> None:
  """Calls `main`; a user-facing error becomes `error: ...` on stderr and exit status 2 (or its
  `exit_code`), a `Stopped` its line and status, Ctrl-C outside a run `interrupted` and 130."""
  if not os.environ.get(DEBUG_ENV):
    # A failure of orbax (a damaged or unwritable checkpoint) is reported here in one line.
    quiet_library_noise()
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
