"""Rank 0's MLflow logging through an actor on the driver's node.

A sqlite (or ``file:``) tracking URI names a file on the driver's machine, and a server at a
loopback address (``http://127.0.0.1:5000``, ``http://localhost:5000``) one that runs there.
Training workers run on other nodes of a cluster, where that path does not exist (or is
another database) and that address is the worker's own node, so rank 0 cannot log there
itself. :func:`start_relay` starts a :class:`TrackingRelay` actor pinned to the driver's
node (no CPU reserved) that owns a :class:`~dino_scale.tracking.logger.ResilientLogger` of
the run; rank 0 talks to it through :class:`RelayClient`, which has the logger's methods.
``fit`` uses the relay for every store: also a server other nodes can reach (``http(s)://``
with a host name, ``databricks``...), whose credentials (``MLFLOW_TRACKING_TOKEN``, ...) are in
the driver's environment only (Ray does not hand it to the workers: rank 0 logging itself was
refused and lost every step metric; the relay is handed them, :func:`client_env`), and through
it rank 0 never waits on a slow store (its calls are fire-and-forget). :func:`is_node_local`
still tells the stores that exist on one machine only.
"""
from __future__ import annotations

import ipaddress
import logging
import os
from typing import Any, Optional
from urllib.parse import urlsplit

__all__ = ["is_node_local", "start_relay", "RelayClient", "drain_relay"]

log = logging.getLogger("dino_scale.tracking")


def _loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a host name: other nodes resolve it as the driver does
        return False
    return address.is_loopback or address.is_unspecified  # 0.0.0.0 / :: reach this machine too


def is_node_local(tracking_uri: str) -> bool:
    """Whether ``tracking_uri`` means something on the machine that names it: a file (sqlite,
    ``file:``, a plain path) or a server at a loopback address (``http://127.0.0.1:5000``,
    ``http://[::1]:5000``, ``http://localhost:5000``; also a database URI on localhost or a
    socket). ``databricks`` and servers named by host name or address are reached from any node."""
    if tracking_uri == "databricks" or tracking_uri.startswith("databricks:"):  # "databricks://profile"
        return False
    if "://" not in tracking_uri:
        return True
    parts = urlsplit(tracking_uri)
    if parts.scheme in ("sqlite", "file"):
        return True
    return not parts.hostname or _loopback(parts.hostname)


# What a client of the store reads from its environment: MLflow's own settings (token, user and
# password, TLS), Databricks' host and token, and the proxy and CA bundle of the HTTP stack.
_CLIENT_ENV_PREFIXES = ("MLFLOW_", "DATABRICKS_")
_CLIENT_ENV_NAMES = frozenset(
    [n for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY") for n in (name, name.lower())]
    + ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"])


def client_env(environ: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The variables of ``environ`` (``os.environ``) a store's client reads: see
    :data:`_CLIENT_ENV_PREFIXES` and :data:`_CLIENT_ENV_NAMES`."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith(_CLIENT_ENV_PREFIXES) or k in _CLIENT_ENV_NAMES}


class TrackingRelay:
    """Actor body: one :class:`ResilientLogger` of ``run_id``; its calls are the logger's.

    ``env``: the driver's :func:`client_env`, set in the actor's process first. A Ray worker
    process gets the environment of the node's raylet, not the driver's: a token exported for the
    driver that joins a running cluster (``RAY_ADDRESS=... MLFLOW_TRACKING_TOKEN=... python -m
    ...``) was not the relay's, whose calls were refused and every step metric lost. (Constructor
    arguments, not ``runtime_env``: the dashboard shows an actor's ``runtime_env``.)"""

    def __init__(self, tracking_uri: str, run_id: str, env: Optional[dict[str, str]] = None):
        from dino_scale.tracking.logger import ResilientLogger

        os.environ.update(env or {})  # this actor's own process
        self.logger = ResilientLogger(tracking_uri, run_id=run_id)

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.logger.log_metrics(metrics, step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.logger.set_tags(tags)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Send everything buffered (waits up to ``timeout_s``); the logger stays usable, for
        the rank 0 of a restarted worker group."""
        return self.logger.close(timeout_s=timeout_s)


def start_relay(tracking_uri: str, run_id: str):
    """A :class:`TrackingRelay` actor on this (the driver's) node; ``ray.kill`` it after the run."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    actor = ray.remote(num_cpus=0, max_restarts=0)(TrackingRelay).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False))
    return actor.remote(tracking_uri, run_id, client_env())


class RelayClient:
    """What rank 0 holds instead of a logger: the same calls, sent to the relay actor
    (fire-and-forget); :meth:`close` waits for everything to be written."""

    def __init__(self, handle):
        self.handle = handle

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.handle.log_metrics.remote(metrics, step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.handle.set_tags.remote(tags)

    def close(self, timeout_s: float = 30.0) -> bool:
        import ray

        from dino_scale.tracking.logger import MAX_REQUEST_TIMEOUT_S

        try:  # the relay may be inside a request to a slow store (up to its longest timeout) before it flushes
            return bool(ray.get(self.handle.flush.remote(timeout_s), timeout=timeout_s + 10 + MAX_REQUEST_TIMEOUT_S))
        except Exception:  # the relay is gone or slow: training results do not depend on it
            return False


def drain_relay(handle, timeout_s: float = 30.0) -> bool:
    """End the relay ``handle`` after sending what it still buffers (up to ``timeout_s``): rank 0
    flushes it when the run ends, but a run that failed or was cut short left the calls it
    buffered while the store was down there, and killing it at once lost them without a word.
    True when everything was sent; a warning on the driver otherwise."""
    import ray

    sent = RelayClient(handle).close(timeout_s=timeout_s)
    if not sent:
        log.warning("MLflow: not everything rank 0 logged reached the store through the tracking relay "
                    "within %.0f s (unreachable, or calls refused: the relay's log says which)", timeout_s)
    try:
        ray.kill(handle)
    except Exception:  # already gone with its node or with Ray
        pass
    return sent
