"""Atomic file publishing: write to a temp file beside the target, then `os.replace`.

A crash or exception mid-write leaves either the old complete file or nothing, never half a file.
"""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def _umask():
    """The process umask, read without changing it where the OS allows.

    os.umask can only be read by setting it; for that instant every file another thread creates
    gets mode 0666/0777, so Linux's /proc/self/status is read instead.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)  # the fallback's window is restrictive, never world-writable
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target):
    """Yield a temp path in `target`'s directory; on clean exit rename it onto `target`.

    The caller writes the whole file to the yielded path (and may verify it) inside the block.
    On any exception the temp file is removed and `target` is left untouched.
    """
    target = Path(target)
    with _staged_path(target) as tmp:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; published files get normal modes
        os.replace(tmp, target)


def atomic_write_bytes(target, data):
    """Write `data` (bytes) to `target` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_files(contents):
    """Publish several files as one set: write every temp file first, then rename them all.

    Args:
        contents: {target path: bytes}.

    A failure while writing any of them leaves every target as it was (the renames only start once
    all temp files are complete).
    """
    with contextlib.ExitStack() as stack:
        staged = []
        for target, data in contents.items():
            tmp = stack.enter_context(_staged_path(Path(target)))
            tmp.write_bytes(data)
            staged.append((tmp, Path(target)))
        mode = 0o666 & ~_umask()
        for tmp, target in staged:
            os.chmod(tmp, mode)
            os.replace(tmp, target)


@contextlib.contextmanager
def _staged_path(target):
    """A temp path beside `target`, removed on exit if it was not renamed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(target, text):
    """Write `text` (str, UTF-8) to `target` atomically."""
    atomic_write_bytes(target, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(target):
    """Yield a temp directory beside `target`; on clean exit it replaces `target` whole.

    Used by export and quantize, which publish several files that only make sense together.
    An existing `target` is kept until the new one is complete, then swapped out.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old / target.name, target)  # put the previous complete output back
                raise
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
