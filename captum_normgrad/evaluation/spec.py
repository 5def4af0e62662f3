"""``voc:PATH``, ``coco:PATH``, ``folder:PATH``: a data set in one string, as the CLI takes it."""

from __future__ import annotations

from captum_normgrad.evaluation.coco import COCODataset
from captum_normgrad.evaluation.dataset import EvaluationDataset
from captum_normgrad.evaluation.folder import ImageFolderDataset
from captum_normgrad.evaluation.voc import VOCDataset

__all__ = ["DATASET_KINDS", "open_dataset"]

DATASET_KINDS = {"voc": "test", "coco": "val2014", "folder": None}
"""The layouts :func:`open_dataset` reads, and each one's default split."""


def open_dataset(spec: str, split: str | None = None) -> EvaluationDataset:
    """Open ``KIND:PATH``.

    Args:
        spec: ``voc:VOCdevkit/VOC2007``, ``coco:path/to/coco`` or ``folder:path/to/classes``.
        split: VOC's ``ImageSets/Main`` list (default ``test``), COCO's split (default
            ``val2014``), or a sub-folder of the class-folder root (default: the root itself).

    Raises:
        ValueError: an unknown kind, or the reader's own complaint about the folder.
    """
    kind, separator, path = spec.partition(":")
    if not separator or kind not in DATASET_KINDS or not path:
        raise ValueError(
            f"--data {spec!r}: give KIND:PATH with KIND one of {', '.join(DATASET_KINDS)} "
            "(e.g. voc:VOCdevkit/VOC2007)"
        )
    split = split or DATASET_KINDS[kind]
    if kind == "voc":
        return VOCDataset(path, split)
    if kind == "coco":
        return COCODataset(path, split)
    return ImageFolderDataset(path if split is None else f"{path}/{split}")
