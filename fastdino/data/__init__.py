"""Data: image readers, torch multi-crop pipeline, iBOT masking, the Batch contract, sample data.

    from fastdino.data import Batch, build_train_loader, sample_images_dir
"""

from fastdino.data.collate import Batch, collate_fn
from fastdino.data.loader import build_train_loader
from fastdino.data.sample_data import digits_labelled_dir, sample_images_dir

__all__ = ["Batch", "collate_fn", "build_train_loader", "sample_images_dir", "digits_labelled_dir"]
