"""Files (and folders) that appear whole or not at all: written beside their destination, synced, then renamed
over it."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["TEMP_SUFFIX", "atomic_path", "remove_orphans", "replace_folder", "staging_name", "write_atomic"]

TEMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, sole_writer: bool = True) -> Iterator[Path]:
    """A temporary file name beside ``path`` for a writer that takes a file name (PyAV, safetensors): when the
    block ends the file is synced and renamed over ``path``, so a reader, or a run killed midway, sees the old
    file or the new one, never a part. If the block fails the temporary file is removed; one orphaned by a kill
    is removed by the next write of the same path (:func:`remove_orphans`).

    The name is ``.<name>.<random>.tmp``: hidden, and in ``path``'s own folder (a rename is atomic only within
    one filesystem, which a temporary folder such as ``$TMPDIR`` on tmpfs is not). The folder is fsynced too,
    so the rename itself survives a power cut. The file ends with the mode a plain ``open`` gives (``0o666``
    less the umask), whatever the writer did: safetensors, like ``tempfile.mkstemp``, makes files ``0o600``.

    ``sole_writer=False`` is for paths that several processes may write at once with the same content (a shared
    cache): the other writers' temporary files are then left alone, so a killed writer's stays behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if sole_writer:
        remove_orphans(path)
    tmp = staging_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # reserves the name, with the umask
    mode = tmp.stat().st_mode & 0o777  # read back rather than computed: reading the umask means changing it
    try:
        yield tmp
        os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # not every platform opens folders (Windows)
        _fsync(path.parent)


def write_atomic(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Writes ``data`` (bytes, text, or a function that writes to the open binary file, e.g. ``torch.save``) to
    ``path`` whole or not at all (:func:`atomic_path`)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data.encode() if isinstance(data, str) else data)
    return path


def staging_name(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``path``, ``.<name>.<random>.tmp``, that :func:`remove_orphans` recognises."""
    path = Path(path)
    return path.parent / f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


def remove_orphans(path: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files (or folders: :func:`replace_folder`) that writes of ``path`` left when their
    process was killed; returns them.

    Only one process writes a given path at a time (rank 0 for a checkpoint, the owner of a batch for saved
    features), so any such file is a dead writer's."""
    path = Path(path)
    orphans = sorted(path.parent.glob(f".{glob.escape(path.name)}.*{TEMP_SUFFIX}"))
    for orphan in orphans:
        if orphan.is_dir() and not orphan.is_symlink():
            shutil.rmtree(orphan, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                orphan.unlink()
    return orphans


def replace_folder(staged: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Puts the complete folder ``staged`` (a :func:`staging_name` beside ``path``, its files written) in place
    of ``path``, a folder or file or nothing, so that ``path`` is at every moment either the old one or the new
    one, whole: its files are synced, then the two are swapped in one step (Linux's ``renameat2`` with
    ``RENAME_EXCHANGE``) and the old one, now at the staged name, is deleted. Where the swap is not available
    (another OS, a filesystem without it) the old one is first renamed aside: a kill between the two renames
    leaves no ``path``, and the old one at a temporary name beside it, until the next write removes it."""
    staged, path = Path(staged), Path(path)
    for folder, _, files in os.walk(staged):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))
    if not path.exists() and not path.is_symlink():
        os.replace(staged, path)
    elif not _exchange(staged, path):
        aside = staging_name(path)
        os.replace(path, aside)
        os.replace(staged, path)
        staged = aside
    with contextlib.suppress(OSError):
        _fsync(path.parent)
    if staged.is_dir() and not staged.is_symlink():
        shutil.rmtree(staged, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
    return path


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+
    except (AttributeError, OSError, TypeError):  # another C library, or Windows (no CDLL(None))
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a filesystem or kernel without the swap
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
