"""Where the files every host shares live: the model repository, the training datasets and
Prefect's task storage. A folder (the shared dir, e.g. NFS) by default, or S3-compatible object
storage (`object_store.url: s3://bucket/prefix`) — which Triton and MLflow read themselves.

`ObjectStore` is the little radloop needs of either: whole objects read and written, the
"folders" under a key listed and removed, a folder of files published at once. Keys are
`/`-separated and relative to the store's root.

* `LocalFolder` writes with `radloop.durable` (atomic, fsynced) and publishes a folder by one
  rename, so a reader never sees half of it.
* `S3Folder` goes through fsspec's S3 file system (s3fs). One object's PUT is atomic; a folder
  is published file by file, the one named `last` at the end, so a reader that needs that file
  (Triton's python backend needs `model.py`) never takes half a folder for a whole one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from radloop.durable import fsync_folder, make_folder_durably, replace_durably, write_bytes_durably

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem


class ObjectStore(Protocol):
    def url(self, key: str = "") -> str:
        """Where `key` is, as a path (local) or `s3://bucket/...` URL."""
        ...

    def read_bytes(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError when there is none."""
        ...

    def write_bytes(self, key: str, data: bytes) -> None: ...

    def folders(self, key: str) -> list[str]:
        """Names of the folders directly under `key` (none when `key` is not there)."""
        ...

    def exists(self, key: str) -> bool: ...

    def remove(self, key: str) -> None:
        """Remove `key` and everything under it (nothing when it is not there)."""
        ...

    def publish(self, key: str, build: Callable[[Path], None], last: str | None = None) -> None:
        """`build` writes files into an empty local folder, which then becomes `key` at once
        (local) or with `last` uploaded after the others (S3). `key` must not exist."""
        ...

    def fetch(self, key: str) -> AbstractContextManager[Path]:
        """A local folder with `key`'s files (the folder itself when local, a temporary
        download otherwise)."""
        ...

    def scratch(self) -> Path:
        """A local folder for files to `put_file` (on the same filesystem when local)."""
        ...

    def put_file(self, local: Path, key: str) -> None:
        """Move a file written durably under `scratch()` to `key`."""
        ...

    def fetch_file(self, url: str) -> AbstractContextManager[Path]:
        """A local path with the bytes of `url` (one of `url()`)."""
        ...


class LocalFolder:
    def __init__(self, root: Path) -> None:
        self.root = root

    def url(self, key: str = "") -> str:
        return str(self.root / key) if key else str(self.root)

    def read_bytes(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        write_bytes_durably(self.root / key, data)

    def folders(self, key: str) -> list[str]:
        folder = self.root / key
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    def exists(self, key: str) -> bool:
        return (self.root / key).exists()

    def remove(self, key: str) -> None:
        """A folder is renamed away first (one atomic step a reader sees), then deleted."""
        target = self.root / key
        if target.is_dir():
            trash = Path(tempfile.mkdtemp(dir=target.parent, prefix=".removed-"))
            target.rename(trash / target.name)
            fsync_folder(target.parent)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)

    def publish(self, key: str, build: Callable[[Path], None], last: str | None = None) -> None:
        target = self.root / key
        if target.exists():
            raise FileExistsError(f"{target} exists")
        make_folder_durably(target.parent)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
        try:
            build(staging)
            for path in staging.rglob("*"):  # build may write with plain open()
                if path.is_file():
                    with path.open("rb+") as written:
                        os.fsync(written.fileno())
            replace_durably(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    @contextmanager
    def fetch(self, key: str) -> Iterator[Path]:
        folder = self.root / key
        if not folder.is_dir():
            raise FileNotFoundError(folder)
        yield folder

    def scratch(self) -> Path:
        return self.root / ".staging"

    def put_file(self, local: Path, key: str) -> None:
        replace_durably(local, self.root / key)

    @contextmanager
    def fetch_file(self, url: str) -> Iterator[Path]:
        yield Path(url)


class S3Folder:
    def __init__(self, url: str, fs: AbstractFileSystem) -> None:
        self.base = url.removeprefix("s3://").strip("/")
        self.fs = fs

    def _path(self, key: str) -> str:
        return f"{self.base}/{key}".rstrip("/") if key else self.base

    def url(self, key: str = "") -> str:
        return f"s3://{self._path(key)}"

    def read_bytes(self, key: str) -> bytes:
        return bytes(self.fs.cat_file(self._path(key)))

    def write_bytes(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(key), data)

    def folders(self, key: str) -> list[str]:
        path = self._path(key)
        self.fs.invalidate_cache(path)  # other hosts write here: never answer from a listing cache
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        names = [
            e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"
        ]
        return sorted(n for n in names if not n.startswith("."))

    def exists(self, key: str) -> bool:
        self.fs.invalidate_cache(self._path(key))
        return bool(self.fs.exists(self._path(key)))

    def remove(self, key: str) -> None:
        path = self._path(key)
        self.fs.invalidate_cache(path)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def publish(self, key: str, build: Callable[[Path], None], last: str | None = None) -> None:
        if self.exists(key):
            raise FileExistsError(self.url(key))
        with tempfile.TemporaryDirectory(prefix="radloop-publish-") as scratch:
            folder = Path(scratch)
            build(folder)
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            files.sort(key=lambda p: p.name == last)  # stable: `last` goes last
            for path in files:
                self.fs.put_file(str(path), self._path(f"{key}/{path.relative_to(folder)}"))

    @contextmanager
    def fetch(self, key: str) -> Iterator[Path]:
        path = self._path(key)
        self.fs.invalidate_cache(path)
        if not self.fs.exists(path):
            raise FileNotFoundError(self.url(key))
        with tempfile.TemporaryDirectory(prefix="radloop-fetch-") as scratch:
            for remote in self.fs.find(path):
                local = Path(scratch) / remote[len(path) + 1 :]
                local.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(remote, str(local))
            yield Path(scratch)

    def scratch(self) -> Path:
        folder = Path(tempfile.gettempdir()) / "radloop-staging"
        folder.mkdir(exist_ok=True)
        return folder

    def put_file(self, local: Path, key: str) -> None:
        self.fs.put_file(str(local), self._path(key))
        local.unlink()

    @contextmanager
    def fetch_file(self, url: str) -> Iterator[Path]:
        if not url.startswith("s3://"):
            raise ValueError(f"{url} is not on the object store")
        name = url.rsplit("/", 1)[-1]
        with tempfile.TemporaryDirectory(prefix="radloop-fetch-") as scratch:
            local = Path(scratch) / name  # the name keeps its extension (.nii.gz)
            self.fs.get_file(url.removeprefix("s3://"), str(local))
            yield local


def s3_filesystem(options: Mapping[str, Any]) -> AbstractFileSystem:
    """fsspec's S3 file system with `options` (`ObjectStoreSettings.filesystem_options`)."""
    import s3fs

    fs: AbstractFileSystem = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    return fs


def triton_location(url: str, endpoint_url: str | None) -> str:
    """Triton's spelling of an S3 folder: `s3://bucket/path` on AWS, `s3://host:port/bucket/path`
    (or `s3://https://host:port/...`) on another S3-compatible endpoint."""
    if not endpoint_url:
        return url
    endpoint = urlsplit(endpoint_url)
    host = endpoint.netloc if endpoint.scheme == "http" else f"https://{endpoint.netloc}"
    return f"s3://{host}/{url.removeprefix('s3://').strip('/')}"


class ObjectStoreSettings(BaseModel):
    """S3-compatible object storage for what every host shares but the DICOM spool and the
    drafts: the model repository, the training datasets, Prefect's task storage and (when
    `radloop up` starts MLflow) MLflow's artifacts. Unset `url`: folders of the shared dir."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # s3://bucket/prefix. Each of the above gets a folder under it.
    url: str | None = Field(None, pattern=r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$")
    # Another S3-compatible service (MinIO, Ceph RGW, ...): its http(s)://host:port; unset: AWS.
    endpoint_url: str | None = Field(None, pattern=r"^https?://[^/]+/?$")
    region: str = "us-east-1"
    # Unset: what the S3 clients find themselves (an instance role, ~/.aws).
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None

    def _secret(self) -> str | None:
        return self.secret_access_key.get_secret_value() if self.secret_access_key else None

    def environment(self) -> dict[str, str]:
        """The variables boto3, s3fs, MLflow and Triton read for the same bucket, for the
        processes that reach it themselves."""
        if not self.url:
            return {}
        values = {
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self._secret(),
        }
        return {key: value for key, value in values.items() if value}

    def filesystem_options(self, *, with_credentials: bool = True) -> dict[str, Any]:
        """s3fs's arguments; without credentials for Prefect's RemoteFileSystem block (which
        Prefect stores in clear), whose s3fs then takes them from `environment()`."""
        options = {"client_kwargs": {"region_name": self.region}, "endpoint_url": self.endpoint_url}
        if with_credentials:
            options |= {"key": self.access_key_id, "secret": self._secret()}
        return {key: value for key, value in options.items() if value}

    def url_of(self, key: str) -> str:
        """`s3://bucket/prefix/<key>` (`url` must be set)."""
        if not self.url:
            raise ValueError("object_store.url is not set")
        return f"{self.url.rstrip('/')}/{key}"

    def store(self, key: str) -> S3Folder:
        """The folder `key` under `url` (which must be set)."""
        return S3Folder(self.url_of(key), s3_filesystem(self.filesystem_options()))
