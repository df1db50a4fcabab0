"""Training engine: one-device train step (torch only), DeepSpeed wiring, Ray Train loop,
distributed COCO evaluation, checkpoints, progress.

``fit`` / ``evaluate_weights`` / ``FitResult`` are imported lazily so that
``dino_scale.engine.train_step`` (benchmarks) never imports Ray, DeepSpeed or MLflow.
"""
from __future__ import annotations

__all__ = ["fit", "evaluate_weights", "FitResult"]


def __getattr__(name):
    if name in __all__:
        from dino_scale.engine import api as _api

        return getattr(_api, name)
    raise AttributeError(f"module 'dino_scale.engine' has no attribute {name!r}")
