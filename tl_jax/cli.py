"""What every script shares: turning the library's errors into one clear line and an exit code."""

from __future__ import annotations

import sys
from typing import Callable

# Errors that describe bad input (files, flags, data). They carry a message written for the
# user, so a script prints it instead of a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError)


def run(main: Callable[[], int | None]) -> None:
  """Calls `main`; a user-facing error becomes `error: ...` on stderr and exit status 2."""
  try:
    status = main()
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    sys.exit(130)
  except USER_ERRORS as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  sys.exit(status or 0)
