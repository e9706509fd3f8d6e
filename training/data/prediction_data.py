"""What a ``predict`` run will read, known before its first batch: its datasets, their records and sample ids.

Callbacks that must refuse bad input before anything is written (an interventions file naming an unknown sample,
DICOM output asked for non-DICOM input) read the prediction data here, in ``on_predict_start``, when Lightning has
set up the prediction data loaders but no batch has run.

A dataset that keeps its samples as a list of records (MONAI's ``Dataset``, as
:class:`~pellucid.training.data.ManifestDataModule` builds: ``{"image": <path>, "id": ..., "source": <path>}``)
is read without loading any image; any other dataset is indexed sample by sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset


def predict_datasets(trainer: pl.Trainer) -> list[Dataset]:
    """The datasets of the running ``predict`` (one per prediction data loader)."""
    loaders = trainer.predict_dataloaders
    if loaders is None:
        return []
    if isinstance(loaders, DataLoader):
        loaders = [loaders]
    elif isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    return [loader.dataset for loader in loaders if isinstance(loader, DataLoader)]


def dataset_records(dataset: Dataset) -> list[Mapping[str, Any]] | None:
    """The records of a dataset that keeps a list of them (``dataset.data``, as MONAI's ``Dataset``), else ``None``."""
    records = getattr(dataset, "data", None)
    if isinstance(records, Sequence) and not isinstance(records, str | bytes) and all(
            isinstance(record, Mapping) for record in records):
        return list(records)
    return None


def dataset_ids(dataset: Dataset) -> list[str]:
    """The sample ids of a dataset: from its records when it keeps them, else by reading each sample's ``id``.

    Raises:
        ValueError: naming the dataset when a sample carries no ``id`` (the batch convention requires one).
    """
    records = dataset_records(dataset)
    if records is not None and all("id" in record for record in records):
        return [str(record["id"]) for record in records]
    ids = []
    for index in range(len(dataset)):  # type: ignore[arg-type]
        sample = dataset[index]
        if not isinstance(sample, Mapping) or "id" not in sample:
            raise ValueError(f"{type(dataset).__name__}: sample {index} has no 'id' (every sample of the batch "
                             "convention names itself)")
        ids.append(str(sample["id"]))
    return ids


def prediction_ids(trainer: pl.Trainer) -> list[str]:
    """Every sample id the running ``predict`` will read, over all its data loaders (and all processes)."""
    return [sample_id for dataset in predict_datasets(trainer) for sample_id in dataset_ids(dataset)]
