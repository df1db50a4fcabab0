"""Fixtures shared by the model tests."""
from __future__ import annotations

import pytest


@pytest.fixture
def checkpointed(monkeypatch) -> list:
    """The functions passed to ``torch.utils.checkpoint.checkpoint`` during the test, in call
    order (the models look it up at call time, so a flag that never reaches it, which gives the
    same outputs and gradients trivially, shows as an empty list). Clear it between runs."""
    import torch.utils.checkpoint as tc

    calls: list = []
    real = tc.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(tc, "checkpoint", counting)
    return calls
