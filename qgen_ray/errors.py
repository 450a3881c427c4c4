"""User-facing errors: one clear line naming the problem and the fix, exit status 2.

Anything a user can cause (a bad flag, a missing folder, an unknown name) raises
`UserError`; the CLI and the study scripts catch it, print its message on one line and
exit with status 2. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
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


INTERRUPT_GRACE_S = 20.0  # after Ctrl-C, how long the run may take to stop by itself
_interrupt = {"at": None, "said": False}  # the first Ctrl-C's time; the line said once


def _say_interrupted() -> None:
    if not _interrupt["said"]:
        _interrupt["said"] = True
        print("interrupted: what finished is kept; re-run the same command to go on",
              file=sys.stderr, flush=True)  # fmt: skip


def _end_now() -> None:
    """End the process at once, status 130: every finished result is already written
    whole (atomic writes), and Ray's local processes share the driver's fate."""
    _say_interrupted()
    os._exit(EXIT_INTERRUPTED)


def _end_if_still_running() -> None:
    time.sleep(INTERRUPT_GRACE_S)
    _end_now()


def _on_ctrl_c(signum, frame) -> None:
    """Ctrl-C raises KeyboardInterrupt, as Python's own handler does. A library may keep
    it from reaching us (seen with Ray Tune on a loaded machine: the run went on), so the
    run is ended INTERRUPT_GRACE_S later if it has not stopped, or at a second Ctrl-C."""
    if _interrupt["at"] is not None:
        _end_now()
    _interrupt["at"] = time.time()
    threading.Thread(target=_end_if_still_running, daemon=True).start()
    raise KeyboardInterrupt


def exit_on_user_error(fn: Callable) -> Callable:
    """Decorate a `main()`: a `UserError` becomes one line on stderr and exit status 2;
    `ItemsFailed` one line and status 1; Ctrl-C one line and status 130 (what finished
    is kept: every result is written as it completes), within INTERRUPT_GRACE_S."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, _on_ctrl_c) if main_thread else None
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None
        except ItemsFailed as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_ITEMS_FAILED) from None
        except KeyboardInterrupt:
            _say_interrupted()
            raise SystemExit(EXIT_INTERRUPTED) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    return wrapper
