"""Which MLflow errors are refusals (the store answered and will never take the call) and
which are outages (the store may come back): :class:`~dino_scale.tracking.logger.ResilientLogger`
drops the first and retries the second."""
from __future__ import annotations

from typing import Optional

__all__ = ["is_refusal", "run_refused", "http_status", "describe", "answered_late"]

# Client-error statuses of a store that may take the call later: retried, like an outage
# (401: credentials can be renewed; 408: request timeout; 429: rate limit).
_RETRIED_4XX = (401, 408, 429)
# Local file errors (a file artifact store refusing the write) and a call that can never be
# made (TypeError: data ``log_dict`` cannot serialise) are refusals too.
_LOCAL_REFUSALS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
                   TypeError)
SPLITTABLE = ("params", "metrics", "tags")  # ops holding a dict of values, resent one by one when refused
QUIET = ("params", "metrics", "tags")  # after its first refusal per error code, logged at debug level


def http_status(exc: BaseException) -> Optional[int]:
    """The HTTP status ``exc`` stands for: an MLflow error code, or the response of an artifact
    store's request (``requests``; botocore's ``ResponseMetadata`` for S3); None otherwise."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):  # a connection error is INTERNAL_ERROR (500)
        return exc.get_http_status_code()
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status if isinstance(status, int) else None


def is_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` says the store answered and will never take this call: a client error
    (MLflow's INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, BAD_REQUEST, PERMISSION_DENIED...,
    an artifact store's HTTP 4xx) but 401/408/429, or a local file error. Connection errors,
    timeouts, TEMPORARILY_UNAVAILABLE and other 5xx are not: the store may come back."""
    status = http_status(exc)
    if status is not None:
        return 400 <= status < 500 and status not in _RETRIED_4XX
    return isinstance(exc, _LOCAL_REFUSALS)


def run_refused(exc: BaseException) -> bool:
    """Whether the refusal ``exc`` is about the run, not the call: a run deleted (or ended) while
    it was logged to takes no call at all, so resending a refused batch key by key (the cure for
    one bad key) made one request per key and step, each refused again."""
    text = str(exc)
    return ("must be in the 'active' state" in text
            or getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST" and "Run " in text)


def answered_late(exc: BaseException) -> bool:
    """Whether ``exc`` is a request that reached the store and got no answer in time (a read
    timeout), unlike a refused connection: a slow or overloaded store, or a hung one."""
    import requests
    from urllib3.exceptions import MaxRetryError, ReadTimeoutError

    seen = set()
    while exc is not None and id(exc) not in seen:  # MLflow's error, raised while handling requests'
        seen.add(id(exc))
        if isinstance(exc, (requests.exceptions.ReadTimeout, ReadTimeoutError)):
            return True
        # Without retries urllib3 ends on MaxRetryError(reason=ReadTimeoutError): requests' ConnectionError
        if any(isinstance(a, MaxRetryError) and isinstance(a.reason, ReadTimeoutError) for a in exc.args):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def describe(op: tuple) -> str:
    """A logging call in words, for the error that drops it."""
    kind = op[0]
    if kind in ("params", "tags"):
        keys = list(op[1])
        return f"{'log_params' if kind == 'params' else 'set_tags'}({', '.join(keys[:5])}" \
               f"{f', ... {len(keys)} in all' if len(keys) > 5 else ''})"
    if kind == "metrics":
        return f"log_metrics({', '.join(op[1])}) at step {op[3]}"
    if kind == "artifacts":
        return f"log_artifacts({op[1]} -> {op[2] or '.'})"
    if kind == "dict":
        return f"log_dict({op[2]})"
    if kind == "end":
        return f"end_run({op[1]})"
    return f"create run {op[1]['run_name']!r} in experiment {op[1]['experiment']!r}"
