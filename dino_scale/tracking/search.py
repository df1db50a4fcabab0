"""MLflow searches by an exact name: the filter's quoted literal, and every page of a search.

MLflow's search filters take a string literal in single or double quotes with no escape, so a
name holding one kind of quote is quoted with the other, and a name holding both (MLflow
accepts it as a run or model name) cannot be written in a filter at all: its searches run
without the name and compare it in Python (:func:`filter_literal` returns None for it).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

__all__ = ["filter_literal", "pages", "PAGE_SIZE"]

PAGE_SIZE = 1000  # the most one MLflow search page may hold


def filter_literal(value: str) -> Optional[str]:
    """``value`` quoted for an MLflow search filter (``'v'``, or ``"v"`` when it holds ``'``);
    None when it holds both ``'`` and ``"``: no filter can name it, search without it."""
    if "'" in value and '"' in value:
        return None
    quote = '"' if "'" in value else "'"
    return f"{quote}{value}{quote}"


def pages(search: Callable, page_size: int = PAGE_SIZE, **kwargs) -> Iterator:
    """Every result of an MLflow ``search_*`` call (``client.search_runs``...), page after page
    (each call returns one page); ``kwargs`` go to every call. A generator: stop iterating and
    no further page is fetched."""
    token = None
    while True:
        page = search(max_results=page_size, page_token=token, **kwargs)
        yield from page
        token = getattr(page, "token", None)
        if not token:
            return
