"""Where an instance lives in the spool: a path built only from validated UIDs, and the mode
its file is written with. The write itself is `radloop.durable.write_bytes_durably` (temporary
file, fsync, rename, fsync of the folder and of new parent folders)."""

from __future__ import annotations

from pathlib import Path

from radloop.domain import is_valid_uid

# Spooled instances hold patient data: readable by radloop's own user only.
SPOOL_FILE_MODE = 0o600


def instance_path(study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
    """`<study>/<series>/<sop>.dcm`, relative to the spool; refuses anything but UIDs."""
    for uid in (study_uid, series_uid, sop_instance_uid):
        if not is_valid_uid(uid):
            raise ValueError("refusing to build a spool path from an invalid UID")
    return Path(study_uid) / series_uid / f"{sop_instance_uid}.dcm"
