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


DEVICES = ("auto", "cpu", "cuda")


def check_resources(cpus: float, gpus: float, device: str, per: str) -> None:
    """One line for a resource request that cannot run: CPUs must be > 0, GPUs >= 0,
    and `--device cuda` needs a GPU share (Ray shows a task no GPU it did not ask for)."""
    if not cpus > 0 or not gpus >= 0:
        raise UserError(
            f"--cpus-per-{per} must be > 0 and --gpus-per-{per} >= 0 (got {cpus:g} and {gpus:g})"
        )
    if device not in DEVICES:
        raise UserError(f"unknown --device {device!r}; valid: {', '.join(DEVICES)}")
    if device == "cuda" and gpus == 0:
        raise UserError(
            f"--device cuda needs --gpus-per-{per} > 0: Ray gives a {per} a GPU only when it "
            "asks for one (or use --device auto)"
        )


def say_set_aside(path: str, err: BaseException, kept: str, consequence: str) -> None:
    """The one line for a damaged file that was set aside: which file, what is wrong,
    where it now is, what happens next (on stderr; the run goes on)."""
    print(f"warning: damaged file {path} ({err}); kept as {kept}; {consequence}",
          file=sys.stderr, flush=True)  # fmt: skip


EXIT_ITEMS_FAILED = 1
EXIT_INTERRUPTED = 130  # the shell's code for a run stopped by Ctrl-C (SIGINT)


class ItemsFailed(Exception):
    """Stages that finished with some models or items failed: what finished is stored,
    the failed ones are retried by a re-run. `failures` maps a stage to its error lines."""

    def __init__(self, failures: dict[str, list[str]]):
        self.failures = failures
        parts = [f"{stage}: {len(lines)} failed (e.g. {lines[0].splitlines()[0][:200]})"
                 for stage, lines in failures.items()]  # fmt: skip
        super().__init__("; ".join(parts) + "; a re-run retries them")


def exit_on_user_error(fn: Callable) -> Callable:
    """Decorate a `main()`: a `UserError` becomes one line on stderr and exit status 2;
    `ItemsFailed` one line and status 1; Ctrl-C one line and status 130 (what finished
    is kept: every result is written as it completes)."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None
        except ItemsFailed as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_ITEMS_FAILED) from None
        except KeyboardInterrupt:
            print("interrupted: what finished is kept; re-run the same command to go on",
                  file=sys.stderr)  # fmt: skip
            raise SystemExit(EXIT_INTERRUPTED) from None

    return wrapper
