"""Datasets in their MMSegmentation on-disk layouts (docs/protocol.md §10) and a generic folder set."""
from .datasets import DatasetError, FolderDataset, Sample, SegmentationDataset, build_dataset

__all__ = ["DatasetError", "FolderDataset", "Sample", "SegmentationDataset", "build_dataset"]
