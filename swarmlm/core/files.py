"""Files that are whole or absent: every file swarmlm writes for later goes through `atomic_write`.

A crash (power loss, OOM kill) mid-write must leave either the old file or the new one, never half of
one: the bytes go to a hidden temporary sibling, which is fsynced, renamed over the target, and the
directory fsynced so the rename itself survives.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_sibling(path: Path, mode: int = 0o666) -> Path:
    """A new, empty, hidden file beside `path` (created exclusively; `mode` before the umask: 0o600 for
    secrets, else the permissions of an ordinary file, which tempfile.mkstemp would not give)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
            return tmp
        except FileExistsError:
            continue


def atomic_write(path: str | Path, data: bytes | str | Callable[[Path], None], mode: int = 0o666) -> None:
    """Write `path` whole or not at all. `data` is the content, or a function that writes a file at the
    path it is given (e.g. safetensors' save_file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path, mode)
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Fill the yielded temporary sibling folder; on a clean exit its files are fsynced and it replaces
    `path` (an existing one is removed first), on an exception it is removed. Readers see the old folder
    or the whole new one (a crash between the removal and the rename leaves none: never a partial one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}"
    tmp.mkdir()  # not tempfile.mkdtemp: that folder would be private to its owner
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
