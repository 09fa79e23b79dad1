"""Prefect's storage for background tasks' parameters and results, which submitters and
workers on every host must share: a folder of the shared dir (`prefect-results/`), or, with
`object_store.url`, `prefect-results/` on the object store through a RemoteFileSystem block
(fsspec's s3fs). The block holds the bucket's address and endpoint, never its credentials:
each process has them in its environment (`ObjectStoreSettings.environment`)."""

from __future__ import annotations

import os
import threading
from typing import Any

from radloop.settings import Settings

BLOCK_NAME = "radloop-task-storage"
BLOCK_SLUG = f"remote-file-system/{BLOCK_NAME}"
_saved = threading.Event()


def storage_settings(settings: Settings) -> dict[Any, str]:
    """Prefect settings (for `temporary_settings`) that point task storage and results at the
    shared place; with an object store, also puts its credentials into this process's
    environment, where s3fs reads them."""
    from prefect.settings import (
        PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        PREFECT_TASK_SCHEDULING_DEFAULT_STORAGE_BLOCK,
    )

    if not settings.object_store.url:
        return {PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(settings.prefect_results_dir)}
    os.environ.update(settings.object_store.environment())
    return {
        PREFECT_TASK_SCHEDULING_DEFAULT_STORAGE_BLOCK: BLOCK_SLUG,
        PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: BLOCK_SLUG,
    }


def save_storage_block(settings: Settings) -> None:
    """Create or update the RemoteFileSystem block the settings above name (once per
    process; raises while the Prefect API is away, so the next call tries again)."""
    if not settings.object_store.url or _saved.is_set():
        return
    from prefect.filesystems import RemoteFileSystem

    block = RemoteFileSystem(
        basepath=settings.object_store.url_of("prefect-results"),
        settings=settings.object_store.filesystem_options(with_credentials=False),
    )
    block.save(BLOCK_NAME, overwrite=True)
    _saved.set()
