"""Ray Train dataset assignment for the engine: ``val`` is split without dropping rows.

``ray.train.DataConfig`` splits with ``streaming_split(world, equal=True)``, which drops the
rows that do not divide evenly among the workers. For training that is what a fixed number
of steps per epoch wants; for evaluation it silently left images out while COCO AP was
computed against every image of the ground truth (5 images on 2 workers: one never
predicted, AP of perfect detections 0.75). :class:`EngineDataConfig` splits ``val`` with
``equal=False`` (every row goes to exactly one worker) and everything else as its parent.
"""
from __future__ import annotations

from typing import Any, Optional

import ray.train

__all__ = ["EngineDataConfig", "UNEVEN"]

UNEVEN = ("val",)  # datasets split without dropping rows


class EngineDataConfig(ray.train.DataConfig):
    """``DataConfig`` with ``val`` (:data:`UNEVEN`) split by ``streaming_split(equal=False)``."""

    def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Optional[list],
                  worker_node_ids: Optional[list], **kwargs) -> list[dict[str, Any]]:
        rest = {k: v for k, v in datasets.items() if k not in UNEVEN}
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        hints = worker_node_ids if self._enable_shard_locality else None
        for name in UNEVEN:
            if name not in datasets:
                continue
            ds = datasets[name]
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[i][name] = split
        return output
