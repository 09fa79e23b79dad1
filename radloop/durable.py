"""Durable, atomic file writes: the one way radloop puts a file whose loss matters on disk.

Today it writes spooled instances (`dicom_listener.spool`), draft and correction SEGs and
NIfTI label maps (`agents.drafts`, `agents.nifti`), the training pairs of validated labels
(`agents.review.training_set`), and model versions, their Triton configuration and the serving
pointer (`model_registry.repository`).

The recipe is the same everywhere: a temporary file beside the target (same folder, so the
rename cannot cross filesystems), write, fsync the file, rename it over the target, fsync the
folder. Folders it creates are fsynced into their parents. A reader sees the old file or the
new one, never part of one; once a call returns, the new file survives a crash or power loss.
A failure removes the temporary file and leaves the old target as it was.

Three shapes of the one recipe:

- `write_bytes_durably(target, data)`: the bytes are in memory (or in two halves:
  `stage_bytes` writes and fsyncs the temporary file, `replace_durably` puts it in place);
- `durable_path(target)`: a library writes to a path itself (`nib.save`, `Dataset.save_as`,
  `torch.jit.save`); the temporary name ends with the target's name, so a library that picks
  the format from the extension (`.nii.gz`) picks the same one;
- `replace_durably(source, target)`: a file or folder already written durably elsewhere on the
  same filesystem (a staged training pair, a staged model version) is moved into place.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

# Like open(): what the process umask allows. The spool asks for 0o600.
DEFAULT_MODE = 0o666


def write_bytes_durably(
    target: Path, data: bytes | Sequence[bytes | memoryview], *, mode: int = DEFAULT_MODE
) -> None:
    """Put `data` (bytes, or chunks written with one writev each round, never joined) at
    `target` atomically and durably; creates missing folders. `mode` is masked by the umask."""
    temp = stage_bytes(target, data, mode=mode)
    try:
        replace_durably(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def stage_bytes(
    target: Path, data: bytes | Sequence[bytes | memoryview], *, mode: int = DEFAULT_MODE
) -> Path:
    """The first half of `write_bytes_durably`: `data` written and fsynced to a temporary file
    beside `target`, whose path is returned for the caller to `replace_durably` over
    `target` or to unlink. On failure nothing is left behind."""
    folder = target.parent
    make_folder_durably(folder)
    fd, temp = _create_temp(folder, target.name, mode)
    try:
        try:
            chunks: list[bytes | memoryview] = [data] if isinstance(data, bytes) else [*data]
            while chunks:
                chunks = _advance(chunks, os.writev(fd, chunks))
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


@contextmanager
def durable_path(target: Path, *, mode: int = DEFAULT_MODE) -> Iterator[Path]:
    """A temporary path beside `target` for a library to write; when the block ends normally
    the file is fsynced and renamed over `target`, and the folder fsynced. When the block
    raises, the temporary file is removed and `target` is untouched.

    The temporary file exists (empty) when the block starts; its name starts with a dot and
    ends with `target.name`."""
    folder = target.parent
    make_folder_durably(folder)
    fd, temp = _create_temp(folder, target.name, mode)
    os.close(fd)
    try:
        yield temp
        _fsync_file(temp)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_folder(folder)


def replace_durably(source: Path, target: Path) -> None:
    """Rename `source` (a file or folder whose contents are already durable) to `target` and
    fsync the folders whose entries changed; creates `target`'s folder if missing.

    Atomic only within one filesystem, as `os.replace`: stage beside the target."""
    make_folder_durably(target.parent)
    os.replace(source, target)
    fsync_folder(target.parent)
    if source.parent != target.parent and source.parent.resolve() != target.parent.resolve():
        fsync_folder(source.parent)


def make_folder_durably(folder: Path) -> None:
    """Create `folder` and any missing parents, each fsynced into its parent (a new folder is
    an entry of its parent: without this a crash can lose the folder with its files)."""
    if folder.is_dir():
        return
    missing = []
    for path in (folder, *folder.parents):
        if path.is_dir():
            break
        missing.append(path)
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
        fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make the entries of `folder` (names created, renamed, removed) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temp(folder: Path, name: str, mode: int) -> tuple[int, Path]:
    """A new file beside the target, open for writing; O_EXCL so no one else's is reused."""
    while True:
        temp = folder / f".{secrets.token_hex(6)}.part-{name}"
        try:
            return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), temp
        except FileExistsError:
            continue


def _advance(chunks: list[bytes | memoryview], written: int) -> list[bytes | memoryview]:
    """What is left of `chunks` after a (possibly short) writev of `written` bytes."""
    while chunks and written >= len(chunks[0]):
        written -= len(chunks[0])
        chunks = chunks[1:]
    if chunks and written:
        chunks = [memoryview(chunks[0])[written:], *chunks[1:]]
    return chunks
