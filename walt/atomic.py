"""Files that appear whole or not at all: written beside their destination, synced, then renamed over it."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["TEMP_SUFFIX", "remove_orphans", "write_atomic"]

TEMP_SUFFIX = ".tmp"


def write_atomic(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Writes ``data`` (bytes, text, or a function that writes to the open binary file, e.g. ``torch.save``) to
    ``path`` so that a reader, or a run killed midway, sees the old file or the new one, never a part.

    The bytes go to ``.<name>.<random>.tmp`` beside ``path`` (a rename is atomic only within one filesystem, which
    a temporary folder such as ``$TMPDIR`` on tmpfs is not), are fsynced, and replace ``path`` in one rename; the
    folder is fsynced too, so the rename itself survives a power cut. On any failure the temporary file is
    removed; one orphaned by a kill is removed by the next write of the same path (:func:`remove_orphans`).
    The file gets the umask's permissions, as a plain ``open`` would give it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # not mkstemp: that makes mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_folder(path.parent)
    return path


def remove_orphans(path: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files that writes of ``path`` left when their process was killed; returns them.

    Only one process writes a given path at a time (rank 0 for a checkpoint, the owner of a batch for saved
    features), so any such file is a dead writer's."""
    path = Path(path)
    orphans = sorted(path.parent.glob(f".{glob.escape(path.name)}.*{TEMP_SUFFIX}"))
    for orphan in orphans:
        with contextlib.suppress(FileNotFoundError):
            orphan.unlink()
    return orphans


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform opens folders (Windows)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
