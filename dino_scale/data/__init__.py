"""Data: record shards, streaming conversion, decoding, DINO augmentation, loaders.

Torch- and Ray-dependent names load lazily, so the converter (and its child process)
imports only numpy, pyarrow, ijson and PIL.
"""
from __future__ import annotations

import importlib

from .convert import ConversionError, convert_coco
from .decode import ImageDecodeError, decode_image
from .json_stream import MalformedJSONError
from .manifest import ManifestError, ShardError, read_manifest, shard_paths
from .records import SCHEMA, iter_records, to_coco_gt

_LAZY = {
    "DetectionTransform": "transforms", "normalize_batch": "transforms", "dino_resize_size": "transforms",
    "collate": "collate", "collate_numpy_batch": "collate", "LocalLoader": "loader", "iter_samples": "loader",
    "build_train_dataset": "ray_data", "build_eval_dataset": "ray_data", "decode_skips": "run_stats",
    "exif_ties": "run_stats", "set_epoch": "run_stats", "current_epoch": "run_stats",
    "generate_synthetic": "synthetic",
}

__all__ = ["convert_coco", "ConversionError", "MalformedJSONError", "ImageDecodeError", "decode_image", "SCHEMA",
           "ManifestError", "ShardError", "iter_records", "read_manifest", "shard_paths", "to_coco_gt", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        mod = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(mod, "generate" if name == "generate_synthetic" else name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
