"""What every script shares: turning the library's errors into one clear line and an exit code."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

# Errors that describe bad input (files, flags, data). They carry a message written for the
# user, so a script prints it instead of a traceback. tl_jax's own errors (ConfigError,
# DataError, WeightsError, CheckpointError, ...) derive from ValueError or RuntimeError.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError)

# Set to 1 to see the traceback behind an `error: ...` line.
DEBUG_ENV = 'TL_JAX_DEBUG'


def _is_ours(error: BaseException) -> bool:
  return type(error).__module__.split('.')[0] == 'tl_jax' or isinstance(error, FileNotFoundError)


def run(main: Callable[[], int | None]) -> None:
  """Calls `main`; a user-facing error becomes `error: ...` on stderr and exit status 2."""
  try:
    status = main()
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    sys.exit(130)
  except USER_ERRORS as e:
    if os.environ.get(DEBUG_ENV):
      traceback.print_exc()
    print(f'error: {e}', file=sys.stderr)
    if not _is_ours(e) and not os.environ.get(DEBUG_ENV):
      # Not one of tl_jax's own messages: it may come from a library or a bug, so say how to see where.
      print(f'(raised as {type(e).__name__}; run with {DEBUG_ENV}=1 for the traceback)', file=sys.stderr)
    sys.exit(2)
  sys.exit(status or 0)
