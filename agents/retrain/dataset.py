"""The validated labels of one model as training and holdout volumes, and what an ML engineer
needs to rebuild that dataset (label ids and DICOM UIDs, no patient data)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import func, select

from agents.nifti import read_label_map, read_nifti, voxel_spacing
from radloop.db import Label, Store
from radloop.domain import LabelSplit
from radloop.objectstore import ObjectStore


@dataclass(frozen=True)
class Volume:
    label_id: int
    hu: NDArray[Any]
    labels: NDArray[Any]
    spacing: tuple[float, float, float]


def read_pair(
    datasets: ObjectStore, image_path: str, label_path: str
) -> tuple[NDArray[Any], NDArray[Any], Any]:
    """A dataset pair written by validation: HU and labels as (slice, row, column), spacing."""
    with datasets.fetch_file(image_path) as image, datasets.fetch_file(label_path) as label:
        hu, affine = read_nifti(image, dtype=np.float32)
        return hu, read_label_map(label), voxel_spacing(affine)


def train_labels_since(store: Store, model: str, since: datetime | None) -> int:
    """Validated train labels of `model` created after `since` (all of them when None)."""
    with store.read() as session:
        query = select(func.count()).where(
            Label.model_name == model, Label.split == LabelSplit.TRAIN.value
        )
        if since is not None:
            query = query.where(Label.created_at > since)
        return int(session.scalar(query) or 0)


def load_volumes(
    store: Store,
    datasets: ObjectStore,
    model: str,
    split: LabelSplit,
    only: Collection[int] | None = None,
) -> list[Volume]:
    """Every validated pair of `model` in `split` (of the labels `only`), in label order."""
    query = (
        select(Label.id, Label.image_path, Label.label_path)
        .where(Label.model_name == model, Label.split == split.value)
        .order_by(Label.id)
    )
    if only is not None:
        query = query.where(Label.id.in_(list(only)))
    with store.read() as session:
        rows = session.execute(query).all()
    volumes = []
    for label_id, image_path, label_path in rows:
        hu, labels, spacing = read_pair(datasets, image_path, label_path)
        volumes.append(Volume(label_id, hu, labels, spacing))
    return volumes


def manifest(
    store: Store, model: str, train_set: list[Volume], holdout: list[Volume]
) -> dict[str, Any]:
    """Label ids and DICOM UIDs only: what an ML engineer needs to rebuild the dataset."""
    with store.read() as session:
        rows = {
            row.id: row
            for row in session.scalars(
                select(Label).where(Label.id.in_([v.label_id for v in train_set + holdout]))
            )
        }

    def entry(volume: Volume) -> dict[str, Any]:
        label = rows[volume.label_id]
        return {
            "label_id": label.id,
            "annotation_id": label.annotation_id,
            "series_instance_uid": label.series_uid,
            "seg_sop_instance_uid": label.seg_sop_instance_uid,
        }

    return {
        "model": model,
        "train": [entry(v) for v in train_set],
        "holdout": [entry(v) for v in holdout],
    }
