"""Which MLflow run a resumed training run continues (tag ``resumed_from_run_id``), on a real
sqlite store. The Ray side (a rerun under the same run name gets the tag) is asserted in
tests/engine/test_engine_rerun.py."""
from __future__ import annotations

import logging
import sys
import uuid
from pathlib import Path

from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlflow_server import free_port  # noqa: E402

from mlflow_store import seeded_store  # noqa: E402
from dino_scale.engine.checkpoint import TrainState  # noqa: E402
from dino_scale.tracking.resume import resumed_from_run_id  # noqa: E402


def _run(client, exp_id: str, name: str, start: int, stage: str = "train") -> str:
    return client.create_run(exp_id, start_time=start, run_name=name, tags={"stage": stage}).info.run_id


def test_resumed_run_links_the_run_that_wrote_its_checkpoint(tmp_path, caplog, monkeypatch):
    """The checkpoint's own run id (``mlflow_run_id`` of its trainer state) is the link when this
    store holds that run; a run of another store links to nothing (not to a same-named run here);
    a checkpoint from before it named its run links to the newest earlier training run of the
    same name in the same experiment. A store that fails is logged, not raised. Was: a resumed
    run's MLflow run named nothing of the run it continued."""
    uri = seeded_store(tmp_path)
    client = MlflowClient(uri)
    exp, other_exp = client.create_experiment("train-exp"), client.create_experiment("other-exp")
    first = _run(client, exp, "r1", 1000)
    second = _run(client, exp, "r1", 2000)
    _run(client, exp, "r1", 2500, stage="evaluate")  # an evaluation under the same name
    _run(client, exp, "r2", 2600)  # another run name
    _run(client, other_exp, "r1", 2700)  # the same name in another experiment
    current = _run(client, exp, "r1", 3000)
    _run(client, exp, "r1", 4000)  # started after this one: not what it continues

    assert TrainState.from_dict({"mlflow_run_id": first}).mlflow_run_id == first  # kept in the checkpoint
    assert TrainState().mlflow_run_id == ""
    assert resumed_from_run_id(client, "train-exp", "r1", first, current) == first
    assert resumed_from_run_id(client, "train-exp", "r1", current, current) is None
    assert resumed_from_run_id(client, "train-exp", "r1", uuid.uuid4().hex, current) is None  # another store
    # a checkpoint without its run id: the newest earlier training run of that name in the experiment
    assert resumed_from_run_id(client, "train-exp", "r1", "", current) == second
    assert resumed_from_run_id(client, "train-exp", "r1", None, None) is not None
    assert resumed_from_run_id(client, "train-exp", "r3", "", current) is None
    assert resumed_from_run_id(client, "no-such-exp", "r1", "", current) is None
    # the pipelines tag their training runs with their stage: a fine-tune continues a fine-tune
    ft_first = _run(client, exp, "ft", 5000, stage="finetune")
    _run(client, exp, "ft", 5500, stage="evaluate")
    ft_now = _run(client, exp, "ft", 6000, stage="finetune")
    assert resumed_from_run_id(client, "train-exp", "ft", "", ft_now) == ft_first
    pre_first = _run(client, exp, "pre", 7000, stage="pretrain")
    pre_now = _run(client, exp, "pre", 8000, stage="pretrain")
    assert resumed_from_run_id(client, "train-exp", "pre", None, pre_now) == pre_first

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a store that does not answer
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    down = MlflowClient(f"http://127.0.0.1:{free_port()}")
    with caplog.at_level(logging.WARNING, logger="dino_scale.tracking.resume"):
        assert resumed_from_run_id(down, "train-exp", "r1", first, current) is None
        assert resumed_from_run_id(down, "train-exp", "r1", "", current) is None
    assert "could not be looked up" in caplog.text and "resumed_from_run_id" in caplog.text


def test_resumed_run_whose_name_holds_both_quotes_links_its_earlier_run(tmp_path):
    """A run name holding ' and " (MLflow takes it as a run name; no search filter can quote it)
    is matched over the experiment's runs. Was: the lookup returned None, so a resumed run of
    that name silently got no resumed_from_run_id tag."""
    client = MlflowClient(seeded_store(tmp_path))
    exp = client.create_experiment("train-exp")
    name = """it's "r1\""""
    first = _run(client, exp, name, 1000)
    second = _run(client, exp, name, 2000)
    _run(client, exp, name, 2500, stage="evaluate")
    _run(client, exp, "its r1", 2600)  # a name without the quotes: not this run
    current = _run(client, exp, name, 3000)
    _run(client, exp, name, 4000)  # started after this one
    assert resumed_from_run_id(client, "train-exp", name, "", current) == second
    assert resumed_from_run_id(client, "train-exp", name, first, current) == first
    assert resumed_from_run_id(client, "train-exp", name + "x", "", current) is None
    # one quote kind: the filtered search (quoted with the other kind)
    single = _run(client, exp, "it's", 1500)
    assert resumed_from_run_id(client, "train-exp", "it's", "", _run(client, exp, "it's", 5000)) == single


def test_search_pages_reads_every_page_and_quotes_names(tmp_path):
    """The shared search helpers: a literal for a name with one quote kind, None for both;
    every page of a search (runs past the first page were not looked at: one page of 50)."""
    from dino_scale.tracking.search import filter_literal, pages

    assert filter_literal("a") == "'a'" and filter_literal("it's") == '"it\'s"'
    assert filter_literal('say "hi"') == """'say "hi"'""" and filter_literal("""it's "x\"""") is None
    client = MlflowClient(seeded_store(tmp_path))
    exp = client.create_experiment("e")
    ids = [_run(client, exp, "r", 1000 + i) for i in range(5)]
    got = [r.info.run_id for r in pages(client.search_runs, page_size=2, experiment_ids=[exp],
                                       order_by=["attributes.start_time ASC"])]
    assert got == ids


def test_a_resume_from_other_initial_weights_is_refused(tmp_path):
    """A resumed run continues its checkpoint, so it keeps the initial weights of the run it
    continues: the same registered version (named through an alias or a version number alike) is
    accepted; another version (the ``@pretrained`` alias moved), weights where there were none,
    or none where there were some is a ConfigError naming both. Was: the resumed fine-tune's run
    and the version registered from it named the new version, whose weights it never used."""
    import pytest

    from dino_scale.config import ConfigError
    from dino_scale.tracking.resume import check_same_source, source_identity

    uri = seeded_store(tmp_path)
    client = MlflowClient(uri)
    exp = client.create_experiment("finetune")
    v3 = {"stage": "train", "source.uri": "models:/dino-o365@pretrained", "source.model_name": "dino-o365",
          "source.model_version": "3", "source.run_id": "abc"}
    first = client.create_run(exp, start_time=1000, run_name="ft", tags=v3).info.run_id
    scratch = client.create_run(exp, start_time=1000, run_name="ft-scratch", tags={"stage": "train"}).info.run_id

    same_by_number = dict(v3, **{"source.uri": "models:/dino-o365/3"})
    check_same_source(client, "finetune", "ft", first, same_by_number)
    assert source_identity(same_by_number) == source_identity(v3)
    moved = dict(v3, **{"source.model_version": "4", "source.run_id": "def"})
    with pytest.raises(ConfigError, match=r"started from models:/dino-o365/3; this call starts from "
                                          r"models:/dino-o365/4"):
        check_same_source(client, "finetune", "ft", first, moved)
    with pytest.raises(ConfigError, match="this call starts from no initial weights"):
        check_same_source(client, "finetune", "ft", first, {})
    with pytest.raises(ConfigError, match="started from no initial weights"):
        check_same_source(client, "finetune", "ft-scratch", scratch, v3)
    check_same_source(client, "finetune", "ft-scratch", scratch, {"init": "scratch"})
    # a local file is named by its URI; nothing to compare with when the store has no such run
    assert source_identity({"source.uri": "/ckpt/a.pth"}) == (("source.uri", "/ckpt/a.pth"),)
    # fresh class heads (--class-heads fresh) are other initial weights than mapped ones
    fresh = dict(v3, **{"source.class_heads": "fresh"})
    assert source_identity(dict(v3, **{"source.class_heads": "map"})) == source_identity(v3) != source_identity(fresh)
    assert source_identity({"source.uri": "/a.pth", "source.class_heads": "fresh"}) == (
        ("source.uri", "/a.pth"), ("source.class_heads", "fresh"))
    assert source_identity({"source.class_heads": "fresh"}) is None
    with pytest.raises(ConfigError, match=r"started from the same weights with --class-heads map: pass "
                                          r"--class-heads map to resume"):
        check_same_source(client, "finetune", "ft", first, fresh)
    with pytest.raises(ConfigError, match=r"started from models:/dino-o365/3; this call starts from "
                                          r"models:/dino-o365/4 with fresh class heads"):
        check_same_source(client, "finetune", "ft", first, dict(moved, **{"source.class_heads": "fresh"}))
    check_same_source(client, "finetune", "ft", uuid.uuid4().hex, moved)
