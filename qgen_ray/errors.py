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


class DamagedFile(Exception):
    """A stored file that exists but cannot be read back (truncated, corrupted): not the
    user's mistake and not a bug. Whoever reads it sets it aside (`StudyStore.set_aside`,
    kept as `<name>.damaged`) and recomputes what it held."""

    def __init__(self, rel: str, cause: BaseException):
        self.rel, self.cause = rel, cause
        first = str(cause).splitlines()[0] if str(cause) else ""
        super().__init__(f"{rel}: {cause.__class__.__name__}{': ' + first if first else ''}")


def say_set_aside(path: str, err: BaseException, kept: str, consequence: str) -> None:
    """The one line for a damaged file that was set aside: which file, what is wrong,
    where it now is, what happens next (on stderr; the run goes on)."""
    print(f"warning: damaged file {path} ({err}); kept as {kept}; {consequence}",
          file=sys.stderr, flush=True)  # fmt: skip


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
