"""The one durable write: whole content under the final name, no temporary file left behind,
and the old file intact when a write fails."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

import radloop.durable as durable
from radloop.durable import durable_path, replace_durably, write_bytes_durably


def _names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_a_write_leaves_the_whole_content_under_the_name_and_no_temporary_file(
    tmp_path: Path,
) -> None:
    target = tmp_path / "1.2.3.dcm"
    write_bytes_durably(target, b"first")
    write_bytes_durably(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert _names(tmp_path) == ["1.2.3.dcm"]


def test_chunks_are_written_in_order_without_being_joined(tmp_path: Path) -> None:
    target = tmp_path / "chunks.bin"
    big = bytes(range(256)) * 4096
    write_bytes_durably(target, [b"head", memoryview(big)[10:], b"", b"tail"])
    assert target.read_bytes() == b"head" + big[10:] + b"tail"


def test_a_short_writev_is_resumed_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writev = os.writev

    def at_most_three_bytes(fd: int, chunks: list[bytes | memoryview]) -> int:
        return writev(fd, [memoryview(chunks[0])[:3]])

    monkeypatch.setattr(os, "writev", at_most_three_bytes)
    target = tmp_path / "short.bin"
    write_bytes_durably(target, [b"abcdefgh", b"ij"])
    assert target.read_bytes() == b"abcdefghij"


def test_a_failed_write_leaves_the_old_file_intact_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "serving.json"
    write_bytes_durably(target, b'{"version": 1}')

    def disk_full(fd: int, chunks: list[bytes | memoryview]) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_bytes_durably(target, b'{"version": 2}')
    assert target.read_bytes() == b'{"version": 1}'
    assert _names(tmp_path) == ["serving.json"]


def test_a_library_writing_to_the_path_sees_the_targets_extension(tmp_path: Path) -> None:
    target = tmp_path / "a1_label.nii.gz"
    with durable_path(target) as temporary:
        assert temporary.parent == tmp_path
        assert temporary.name.startswith(".") and temporary.name.endswith(".nii.gz")
        temporary.write_bytes(b"labels")
        assert not target.exists()  # nothing under the final name until the block ends
    assert target.read_bytes() == b"labels"
    assert _names(tmp_path) == ["a1_label.nii.gz"]


def test_a_library_that_fails_halfway_leaves_the_old_file_intact(tmp_path: Path) -> None:
    target = tmp_path / "draft.dcm"
    target.write_bytes(b"old draft")
    with pytest.raises(RuntimeError, match="encoder"), durable_path(target) as temporary:
        temporary.write_bytes(b"half a ne")
        raise RuntimeError("encoder failed")
    assert target.read_bytes() == b"old draft"
    assert _names(tmp_path) == ["draft.dcm"]


def test_new_folders_are_created_and_each_is_fsynced_into_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    fsync_folder = durable.fsync_folder

    def recording(folder: Path) -> None:
        synced.append(folder)
        fsync_folder(folder)

    monkeypatch.setattr(durable, "fsync_folder", recording)
    target = tmp_path / "study" / "series" / "sop.dcm"
    write_bytes_durably(target, b"DICM")
    assert target.read_bytes() == b"DICM"
    # The two new folders into their parents, then the file's rename into its folder.
    assert synced == [tmp_path, tmp_path / "study", tmp_path / "study" / "series"]


def test_the_mode_is_the_callers_masked_by_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_bytes_durably(tmp_path / "spooled.dcm", b"x", mode=0o600)
        write_bytes_durably(tmp_path / "model.json", b"x")
        with durable_path(tmp_path / "model.pt") as temporary:
            temporary.write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "spooled.dcm").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "model.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "model.pt").stat().st_mode) == 0o644


def test_a_staged_file_and_a_staged_folder_are_moved_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    fsync_folder = durable.fsync_folder

    def recording(folder: Path) -> None:
        synced.append(folder)
        fsync_folder(folder)

    staged = tmp_path / ".staging" / "a7_label.nii.gz"
    write_bytes_durably(staged, b"label")
    monkeypatch.setattr(durable, "fsync_folder", recording)
    target = tmp_path / "train" / "000001_label.nii.gz"
    replace_durably(staged, target)
    assert target.read_bytes() == b"label" and not staged.exists()
    # The new folder, the entry that appeared and the one that went.
    assert synced == [tmp_path, tmp_path / "train", tmp_path / ".staging"]

    version = tmp_path / ".staging-x"
    write_bytes_durably(version / "model.pt", b"weights")
    replace_durably(version, tmp_path / "3")
    assert (tmp_path / "3" / "model.pt").read_bytes() == b"weights"
