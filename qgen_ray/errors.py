"""User-facing errors: one clear line naming the problem and the fix, exit status 2.

Anything a user can cause (a bad flag, a missing folder, an unknown name) raises
`UserError`; the CLI and the study scripts catch it, print its message on one line and
exit with status 2. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix. The message says what is wrong and how to fix it."""


def exit_on_user_error(fn: Callable) -> Callable:
    """Decorate a `main()`: a `UserError` becomes one line on stderr and exit status 2."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None

    return wrapper
