"""Durable, atomic placement of instances under a path built only from validated UIDs."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from radloop.domain import is_valid_uid


def instance_path(study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
    """`<study>/<series>/<sop>.dcm`, relative to the spool; refuses anything but UIDs."""
    for uid in (study_uid, series_uid, sop_instance_uid):
        if not is_valid_uid(uid):
            raise ValueError("refusing to build a spool path from an invalid UID")
    return Path(study_uid) / series_uid / f"{sop_instance_uid}.dcm"


def write_durably(target: Path, data: bytes | Sequence[bytes | memoryview]) -> None:
    """Write to a temporary file beside `target`, fsync it, rename, fsync the folder.

    After this returns the file survives a crash or power loss; a reader never sees a partial
    file under the final name.
    """
    folder = target.parent
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        # New study/series folders must themselves be durable entries of their parents.
        _fsync_dir(folder.parent)
        _fsync_dir(folder.parent.parent)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".incoming-", suffix=".part")
    try:
        with os.fdopen(fd, "wb", buffering=0) as handle:
            # Chunks go out with one writev, so a received dataset is never copied to be joined.
            chunks: list[bytes | memoryview] = [data] if isinstance(data, bytes) else [*data]
            while chunks:
                written = os.writev(handle.fileno(), chunks)
                chunks = _advance(chunks, written)
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(folder)


def _advance(chunks: list[bytes | memoryview], written: int) -> list[bytes | memoryview]:
    """What is left of `chunks` after a (possibly short) writev of `written` bytes."""
    while chunks and written >= len(chunks[0]):
        written -= len(chunks[0])
        chunks = chunks[1:]
    if chunks and written:
        chunks = [memoryview(chunks[0])[written:], *chunks[1:]]
    return chunks


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
