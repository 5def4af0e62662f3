"""Saliency methods compared over a whole data set, on one process or many under torchrun.

- Readers (:class:`VOCDataset`, :class:`COCODataset`, :class:`ImageFolderDataset`) list the images
  and their ground truth at the original size, nothing downloaded.
- :class:`Preprocessing`: resize, crop, normalisation, remembering the region of the original
  image the model sees.
- ``evaluation/protocol.py``: TorchRay's pointing game (per class, 15 px at the
  original size, the EBP difficult subset).
- :func:`evaluate_dataset`: methods x layers x metrics, per-example rows appended as computed
  (resumable), each image to exactly one process under torchrun, merged by rank 0.
"""

from captum_normgrad.evaluation.coco import COCODataset
from captum_normgrad.evaluation.dataset import (
    Annotation,
    EvaluationDataset,
    Example,
    read_image,
)
from captum_normgrad.evaluation.distributed import World, launched_by_torchrun, process_group, shard
from captum_normgrad.evaluation.folder import ImageFolderDataset
from captum_normgrad.evaluation.preprocess import Preprocessing, Region, maps_at_original_size
from captum_normgrad.evaluation.protocol import (
    in_difficult_subset,
    pointing_hits,
    read_difficult_flags,
)
from captum_normgrad.evaluation.runner import evaluate_dataset
from captum_normgrad.evaluation.spec import DATASET_KINDS, open_dataset
from captum_normgrad.evaluation.store import ResultsStore
from captum_normgrad.evaluation.summary import summarize
from captum_normgrad.evaluation.voc import VOC_CLASSES, VOCDataset

__all__ = [
    "DATASET_KINDS",
    "VOC_CLASSES",
    "Annotation",
    "COCODataset",
    "EvaluationDataset",
    "Example",
    "ImageFolderDataset",
    "Preprocessing",
    "Region",
    "ResultsStore",
    "VOCDataset",
    "World",
    "evaluate_dataset",
    "in_difficult_subset",
    "launched_by_torchrun",
    "maps_at_original_size",
    "open_dataset",
    "pointing_hits",
    "process_group",
    "read_difficult_flags",
    "read_image",
    "shard",
    "summarize",
]
