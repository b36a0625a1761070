"""Atomic file writes: a reader (or a process killed mid-write) sees the old file or the complete new one, never a
part. Every file mbc-hf writes goes through `atomic_write`."""

import contextlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path


def default_file_mode() -> int:
    """Permission bits a plainly created file would get (0o666 minus the process umask)."""
    umask = 0o022
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    umask = int(line.split()[1], 8)
                    break
    return 0o666 & ~umask


def fsync_dir(directory: str) -> None:
    """Best-effort fsync of a directory, so that a rename inside it survives a crash."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, fsync it, give it the mode of the file it
    replaces (or the umask default), ``os.replace`` it onto ``path`` and fsync the directory.

    On any error (or KeyboardInterrupt) the temporary file is removed and ``path`` is untouched; a process killed
    during the write leaves ``path`` complete plus a stray ``.<name>.<random>.tmp`` that is safe to delete.

    Raises:
        FileNotFoundError: the directory of ``path`` does not exist (it is not created).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    mode = default_file_mode()
    with contextlib.suppress(OSError):
        mode = os.stat(path).st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def temporary_files(directory: str, name: str) -> list[str]:
    """Names in ``directory`` of the temporary files `atomic_write` makes for files whose name fully matches the
    regex ``name`` (``.<name>.<random>.tmp``): strays of killed writers once no writer of those files runs."""
    pattern = re.compile(rf"\.(?:{name})\.[A-Za-z0-9_]+\.tmp")
    return [f for f in os.listdir(directory) if pattern.fullmatch(f)]


def write_text_atomic(path, text: str) -> None:
    """`atomic_write` of UTF-8 ``text``."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
