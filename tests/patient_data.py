"""The patient-data audit: studies pushed with sentinel strings where a hospital's would carry
a name, an ID, a birth date, an accession number and an institution; then every place radloop
writes to is searched for them. A hit anywhere but the DICOM files themselves (and Orthanc,
the store that holds them) is patient data that leaked."""

from __future__ import annotations

import gzip
import io
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from sqlalchemy import MetaData, create_engine, select

# Each unlike anything radloop writes by itself.
SENTINEL_HEADER = {
    "PatientName": "ZQXFAMILY^ZQXGIVEN",
    "PatientID": "ZQXPID4711",
    "PatientBirthDate": "19230417",
    "AccessionNumber": "ZQXACC0815",
    "InstitutionName": "ZQX INSTITUTE",
    "InstitutionAddress": "ZQXSTREET 9",
    "ReferringPhysicianName": "ZQXREFERRER",
}
# What is searched for: each value and the forms a program would turn it into (the name's
# components, the date in ISO form); case-insensitive.
NEEDLES = (
    "zqxfamily",
    "zqxgiven",
    "zqxpid4711",
    "19230417",
    "1923-04-17",
    "zqxacc0815",
    "zqx institute",
    "zqxstreet",
    "zqxreferrer",
)


def carry_patient_data(paths: Iterable[Path]) -> None:
    """Give each DICOM file the sentinel patient, accession and institution (in place)."""
    for path in paths:
        ds = dcmread(path)
        for keyword, value in SENTINEL_HEADER.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=False)


@dataclass(frozen=True)
class Hit:
    where: str
    needle: str
    context: str

    def __str__(self) -> str:
        return f"{self.where}: {self.needle!r} in …{self.context}…"


def hits_in(where: str, data: bytes) -> Iterator[Hit]:
    """The needles in `data`, looking inside gzip and zip containers too (NIfTI files, MLflow's
    and PyTorch's archives)."""
    lowered = data.lower()
    for needle in NEEDLES:
        at = lowered.find(needle.encode())
        if at >= 0:
            context = data[max(0, at - 60) : at + 60].decode("utf-8", "replace")
            yield Hit(where, needle, context)
    if data[:2] == b"\x1f\x8b":
        try:
            inner = gzip.decompress(data)
        except (OSError, EOFError):
            return
        yield from hits_in(f"{where} (gunzipped)", inner)
    elif data[:4] == b"PK\x03\x04":
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
            members = [(m, archive.read(m)) for m in archive.namelist()]
        except (zipfile.BadZipFile, OSError):
            return
        for member, content in members:
            yield from hits_in(f"{where}!{member}", content)


def is_dicom(data: bytes) -> bool:
    return data[128:132] == b"DICM"


def hits_in_files(root: Path, skip: Iterable[Path] = ()) -> Iterator[Hit]:
    """Every file under `root` but the DICOM files (Part 10: the received instances, the
    drafts' SEG) and the folders in `skip`."""
    skipped = tuple(skip)
    for path in sorted(root.rglob("*")):
        if not path.is_file() or any(path.is_relative_to(s) for s in skipped):
            continue
        data = path.read_bytes()
        if not is_dicom(data):
            yield from hits_in(str(path.relative_to(root)), data)


def hits_in_database(url: str) -> Iterator[Hit]:
    """Every column of every row of every table of the database at `url`."""
    engine = create_engine(url)
    try:
        metadata = MetaData()
        metadata.reflect(engine)
        with engine.connect() as connection:
            for table in metadata.sorted_tables:
                for row in connection.execute(select(table)):
                    for column, value in zip(table.columns, row, strict=True):
                        if value is not None:
                            yield from hits_in(f"{table.name}.{column.name}", _bytes(value))
    finally:
        engine.dispose()


def hits_in_bucket(client: Any, bucket: str) -> Iterator[Hit]:
    """Every object of an S3 bucket."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    for item in (item for page in pages for item in page.get("Contents", [])):
        data = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        if not is_dicom(data):
            yield from hits_in(f"s3://{bucket}/{item['Key']}", data)


def unprivileged_views(base_url: str, token: str | None, annotation_ids: list[int]) -> bytes:
    """What the review service shows a reader (or, with no token, anybody) of every GET
    operation in its OpenAPI document and of its pages: one blob, each answer headed by its
    path. Left out: the DICOMweb paths, which serve the DICOM files themselves."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
        document = client.get("/openapi.json")
        paths = [
            path
            for path, operations in document.json()["paths"].items()
            if "get" in operations and not _required_query(operations["get"])
        ]
        paths += ["/", "/worklist", "/dashboard"]
        out = io.BytesIO()
        out.write(f"\n== GET /openapi.json {document.status_code}\n".encode() + document.content)
        datastore = client.get("/monailabel/datastore/", params={"output": "all"})
        out.write(f"\n== GET datastore all {datastore.status_code}\n".encode() + datastore.content)
        images = list(datastore.json().get("objects", {})) if datastore.is_success else []
        for path in paths:
            if "{" in path and "{annotation_id}" not in path:
                continue
            ids = annotation_ids if "{annotation_id}" in path else [None]
            for case in ids:
                concrete = path.replace("{annotation_id}", str(case))
                answer = client.get(concrete)
                out.write(f"\n== GET {concrete} {answer.status_code}\n".encode())
                out.write(answer.content)
        for image in images:
            answer = client.get("/monailabel/datastore/image", params={"image": image})
            out.write(f"\n== GET datastore image {image} {answer.status_code}\n".encode())
            out.write(answer.content)
        return out.getvalue()


def _required_query(operation: dict[str, Any]) -> bool:
    return any(
        p.get("required") and p.get("in") == "query" for p in operation.get("parameters", [])
    )


def _bytes(value: object) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return str(value).encode("utf-8", "replace")
