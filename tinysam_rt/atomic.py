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
    """Publish several files as one set: check every target, write every temp file, then rename
    them all.

    Args:
        contents: {target path: bytes}.

    Raises:
        OSError: naming the target, from `check_writable` or from staging; every target is then
            left as it was (the renames only start once all temp files are complete).
    """
    check_writable(contents)
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


def check_writable(targets):
    """Raise unless each target path can be replaced by a file.

    Writers of a set of files call this before renaming any of them, and the CLIs before their
    slow work, so that one bad target can neither leave a half-replaced set nor waste a run.

    Args:
        targets: iterable of str / Path file paths; missing parent directories are fine (the
            writers create them) as long as the nearest existing one is a writable directory.

    Raises:
        IsADirectoryError / NotADirectoryError / OSError: the message names the target.
    """
    for target in map(Path, targets):
        if target.is_dir():
            raise IsADirectoryError(f"{target} is a directory; cannot write a file there")
        check_parent_writable(target)


def check_parent_writable(target):
    """Raise OSError naming `target` unless entries can be created beside it: its parent, or the
    nearest existing ancestor when the writers would create the parent, is a writable directory.

    Probed with a real temp file: os.access says yes to root, and to /proc.
    """
    target = Path(target)
    directory = _nearest_existing(target.parent)
    if not directory.is_dir():
        raise NotADirectoryError(f"{target}: {directory} is not a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=".probe.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise type(exc)(f"{target}: cannot create files in {directory} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(name)


def _nearest_existing(directory):
    """`directory`, or its closest ancestor that exists (the one a mkdir -p would start in)."""
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return directory


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
    An existing `target` is kept until the new one is complete, then swapped out and deleted:
    callers decide first whether it may be (tinysam_export.out_dir). A file is never replaced.
    """
    # Absolute and normalised ("." or "a/.." has no name to stage beside), symlinks not followed.
    target = Path(os.path.abspath(target))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory; refusing to replace it with one")
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
