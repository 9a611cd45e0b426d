"""The errors a user must act on. The CLI prints any :class:`AdapterctlError` as one line, without a traceback.

Each names what is wrong and where (file, key, value) and, where there is one, what to do instead.
"""

from __future__ import annotations

#: The exit status of a run stopped by SIGTERM/SIGINT after it checkpointed (sysexits' EX_TEMPFAIL: "try again";
#: schedulers can requeue on it). Distinct from 0 (finished), 1 (failed) and 2 (bad command line or config).
EXIT_PREEMPTED = 75


class AdapterctlError(Exception):
    """Base class: a problem the message explains in one line."""

    exit_code = 1


class ConfigError(AdapterctlError, ValueError):
    """A config could not be composed or holds a bad value; the message names the key and what is valid."""

    exit_code = 2


class DataError(AdapterctlError, ValueError):
    """Bad input data; the message names the file and what is wrong with it."""


class CheckpointError(AdapterctlError, ValueError):
    """A checkpoint or weights file that cannot be used; the message names the file and why."""


class OutputError(AdapterctlError, OSError):
    """Something could not be written (unwritable folder, read-only file system, disk full); names the path."""


class DeviceError(AdapterctlError, RuntimeError):
    """The requested device is not available here."""


class TrainingError(AdapterctlError, RuntimeError):
    """Training stopped for a reason the user must act on (the message says which)."""


class Preempted(AdapterctlError):
    """SIGTERM/SIGINT stopped training after it wrote a checkpoint; ``resume=true`` continues it."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, step: int, checkpoint: str | None) -> None:
        self.step, self.checkpoint = step, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint written"
        super().__init__(f"preempted at iteration {step}; {where}; continue with resume=true")


def os_error_in(exc: BaseException) -> OSError | None:
    """The operating system's error in ``exc`` or what it wraps (torch.save reports a full disk as a RuntimeError
    raised while handling the OSError); None when there is none."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and not any(cur is c for c in seen):  # exception chains can loop
        if isinstance(cur, OSError):
            return cur
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return None


def os_reason(exc: BaseException) -> str:
    """The operating system's words for a failed read or write, else the exception's first line."""
    found = os_error_in(exc)
    if found is not None and found.strerror:
        return found.strerror
    text = str(found if found is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
