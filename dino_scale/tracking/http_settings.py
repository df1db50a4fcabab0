"""The HTTP settings of :class:`~dino_scale.tracking.logger.ResilientLogger`'s own requests.

MLflow reads ``MLFLOW_HTTP_REQUEST_TIMEOUT`` / ``_MAX_RETRIES`` / ``_BACKOFF_FACTOR`` from the
environment at each request: the logger puts its own there only while it sends (other MLflow
calls of the process keep MLflow's defaults) and never over a value the user set."""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Iterator, Optional

__all__ = ["HttpSettings"]


class HttpSettings:
    """Mixin: the request settings of a logger whose ``timeout_s`` (the shortest timeout),
    ``request_timeout_s`` (the current one), ``_http_env`` (its variables) and ``_set_here``
    (those it put in the environment, :meth:`_http_settings` keeps it) are set by the class."""

    timeout_s: float
    request_timeout_s: float
    _http_env: dict[str, str]
    _set_here: set[str]

    @contextlib.contextmanager
    def _http_settings(self, deadline: Optional[float] = None) -> Iterator[None]:
        """This logger's HTTP settings in the environment (MLflow reads them per request),
        restored afterwards; a variable the user set is left alone. The request timeout is
        :attr:`request_timeout_s`, cut to what is left before ``deadline`` (not below ``timeout_s``)."""
        timeout = self.request_timeout_s
        if deadline is not None:
            timeout = max(self.timeout_s, min(timeout, deadline - time.monotonic()))
        self._http_env["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(max(1, math.ceil(timeout))))
        added = [k for k in self._http_env if k not in os.environ]
        os.environ.update({k: self._http_env[k] for k in added})
        self._set_here = set(added)
        try:
            yield
        finally:
            self._set_here = set()
            for k in added:
                os.environ.pop(k, None)

    @contextlib.contextmanager
    def _request_timeout(self, seconds: float) -> Iterator[None]:
        """The request timeout for the calls inside (within :meth:`_http_settings`, unless the
        user set ``MLFLOW_HTTP_REQUEST_TIMEOUT``)."""
        key = "MLFLOW_HTTP_REQUEST_TIMEOUT"
        if key not in self._set_here:
            yield
            return
        os.environ[key] = str(int(max(1, seconds, math.ceil(self.request_timeout_s))))
        try:
            yield
        finally:
            os.environ[key] = self._http_env[key]
