"""MLflow tracking (resilient, buffered logging) and the model registry helpers."""
from dino_scale.tracking.logger import ResilientLogger, TrackingUnavailable
from dino_scale.tracking.ops import flatten_params
from dino_scale.tracking.registry import (
    ResolvedModel, get_version_by_alias, load_model_from_uri, register_model, resolve_model_uri,
    set_alias, store_client,
)
from dino_scale.tracking.uris import default_tracking_uri

__all__ = [
    "ResilientLogger", "TrackingUnavailable", "default_tracking_uri", "flatten_params", "ResolvedModel",
    "register_model", "set_alias", "get_version_by_alias", "resolve_model_uri", "load_model_from_uri", "store_client",
]
