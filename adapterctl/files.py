"""Files: atomic writes that respect the umask, clean-up of partial writes, and one safe reader for
``torch.load`` (tensors and plain containers only).

A write goes to a temporary file in the target's folder, is flushed and fsynced, and is renamed over the
target: a crash or a full disk leaves the previous file intact and no partial one. Any failure becomes an
:class:`OutputError` naming the path and the operating system's reason.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from adapterctl.errors import CheckpointError, OutputError, os_error_in, os_reason

_TMP_SUFFIX = ".tmp"


def _umask() -> int:
    """The process umask, read without changing it where the kernel tells it (Linux >= 4.7)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ensure_dir(path: str | Path) -> Path:
    """``mkdir -p``, with one clear error when the folder cannot be made."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create folder {path}: {os_reason(exc)}") from None
    return path


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path`` and rename it over ``path``.

    The file gets the permissions a plain ``open`` would give (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {os_reason(exc)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if os_error_in(exc) is not None:
            raise OutputError(f"cannot write {path}: {os_reason(exc)}") from exc
        raise
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """For writers that want a path, not a file object (ONNX, torch.export): yields a temporary path beside
    ``path``, renamed over it when the block succeeds and removed when it fails."""
    path = Path(path)
    ensure_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if os_error_in(exc) is not None:
            raise OutputError(f"cannot write {path}: {os_reason(exc)}") from exc
        raise


def save_image(image, path: str | Path) -> Path:
    """Atomically save a PIL image (JPEG for .jpg/.jpeg, at quality 92; else PNG)."""
    fmt = "JPEG" if Path(path).suffix.lower() in (".jpg", ".jpeg") else "PNG"
    return atomic_write(path, lambda f: image.save(f, format=fmt, **({"quality": 92} if fmt == "JPEG" else {})))


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def clean_partial_writes(directory: str | Path) -> list[Path]:
    """Remove the temporary files an interrupted :func:`atomic_write` left in ``directory`` (a process killed
    with SIGKILL cannot clean up after itself). Call only where no other process is writing."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.iterdir():
        if p.name.startswith(".") and p.name.endswith(_TMP_SUFFIX) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


_GLOBAL = re.compile(r"GLOBAL (\S+)")


def torch_load(path: str | Path, safe_globals: list | None = None) -> Any:
    """``torch.load(weights_only=True)`` on CPU, with one-line errors naming the file and the reason.

    A pickle that would build an arbitrary object (and so could run code) is refused, naming that object.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    try:
        with torch.serialization.safe_globals(safe_globals or []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        what = f"`{found.group(1)}`" if found else "an object that is not a tensor or a plain container"
        raise CheckpointError(
            f"{path}: refused to unpickle: it needs {what}, which safe loading (weights_only) does not allow "
            "because it can run code; if you trust the file, re-save its state_dict alone"
        ) from None
    except Exception as exc:  # truncated zip, not a torch file, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch file ({reason})") from None
