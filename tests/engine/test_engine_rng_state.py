"""The RNG streams a checkpoint saves and a resume restores (python, numpy, torch), and the block
that keeps the final evaluation's draws off them. A state file holding a pickled object:
test_engine_checkpoint.py."""
from __future__ import annotations

import torch


def _draws() -> tuple:
    import random

    import numpy as np

    return random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()


def _seed_streams(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    np.random.randn()  # an odd count: numpy holds a cached gaussian, part of its state


def test_rng_state_round_trip_restores_every_stream_and_reads_with_weights_only(tmp_path):
    """rng_rank<r>.pt was read with weights_only=False (a pickle in a checkpoint folder on shared
    storage ran on resume): numpy's state tuple holds an ndarray. It is now written as tensors and
    plain values, read with weights_only, and restores the python, numpy and torch streams."""
    from dino_scale.engine.checkpoint import load_rng_state, save_rng_state

    _seed_streams(1)
    save_rng_state(tmp_path, rank=3)
    expected = _draws()
    _seed_streams(2)
    assert load_rng_state(tmp_path, rank=3)
    assert _draws() == expected
    state = torch.load(tmp_path / "rng_rank3.pt", weights_only=True)  # no numpy object left in it
    assert state["numpy"]["key"].shape == (624,)
    assert not load_rng_state(tmp_path, rank=4)  # no file of that rank: nothing restored


def test_rng_state_of_the_earlier_format_still_resumes(tmp_path):
    """A checkpoint written before (numpy's get_state() tuple, its uint32 key array pickled)
    still restores: numpy arrays are the only objects allowed beyond weights_only's own."""
    import random

    import numpy as np

    from dino_scale.engine.checkpoint import load_rng_state

    _seed_streams(5)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               tmp_path / "rng_rank0.pt")
    expected = _draws()
    _seed_streams(6)
    assert load_rng_state(tmp_path, rank=0)
    assert _draws() == expected


def test_rng_untouched_restores_every_stream():
    """What the final evaluation draws (building its model) does not move the streams the final
    checkpoint's RNG files save: the draws after the block are those a run without it makes."""
    import random

    import numpy as np

    from dino_scale.engine.state_files import rng_untouched

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    expected = draws()
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    with rng_untouched():
        torch.nn.Linear(64, 64)  # initialization draws from torch's stream
        draws()
    assert draws() == expected
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    torch.nn.Linear(64, 64)
    assert draws() != expected  # what the final checkpoint saved before
