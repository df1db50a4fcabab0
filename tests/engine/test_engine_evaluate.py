"""COCO evaluation pieces: detection format, AP vs pycocotools run directly, TTA views."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from dino_scale.config import preset
from dino_scale.engine.evaluate import (
    _flip_valid, coco_evaluate, evaluate_batches, gather_to_rank0, predict_batch, to_coco_detections,
)
from dino_scale.models import build_dino
from dino_scale.models.postprocess import PostProcess


def _gt(rng):
    images, anns = [], []
    for i in range(1, 6):
        images.append({"id": i * 7, "width": 320, "height": 240})
        for _ in range(rng.integers(1, 5)):
            x, y = rng.uniform(0, 200), rng.uniform(0, 150)
            w, h = rng.uniform(8, 110), rng.uniform(8, 80)
            anns.append({"id": len(anns) + 1, "image_id": i * 7, "category_id": int(rng.choice([1, 3, 18])),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    return {"images": images, "annotations": anns,
            "categories": [{"id": c, "name": str(c)} for c in (1, 3, 18)]}


def test_ap_equals_pycocotools_directly():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    gt = _gt(rng)
    # postprocessor-style results (xyxy pixels): jittered GT plus false positives
    results, ids = [], []
    for img in gt["images"]:
        boxes, scores, labels = [], [], []
        for a in (a for a in gt["annotations"] if a["image_id"] == img["id"]):
            x, y, w, h = a["bbox"]
            j = rng.normal(0, 3, 4)
            boxes.append([x + j[0], y + j[1], x + w + j[2], y + h + j[3]])
            scores.append(rng.uniform(0.3, 1.0))
            labels.append(a["category_id"] if rng.random() > 0.15 else 3)
        for _ in range(4):
            x, y = rng.uniform(0, 250, 2)
            boxes.append([x, y, x + rng.uniform(5, 60), y + rng.uniform(5, 60)])
            scores.append(rng.uniform(0, 0.5))
            labels.append(int(rng.choice([1, 3, 18])))
        results.append({"boxes": torch.tensor(boxes), "scores": torch.tensor(scores), "labels": torch.tensor(labels)})
        ids.append(img["id"])
    dets = to_coco_detections(results, ids)
    gt_before, dets_before = json.dumps(gt), json.dumps(dets)
    ours = coco_evaluate(gt, dets)
    # the inputs are as they were (pycocotools adds keys to the dicts it gets: copies of them),
    # and scoring them again gives the same numbers
    assert (json.dumps(gt), json.dumps(dets)) == (gt_before, dets_before)
    assert coco_evaluate(gt, dets) == ours
    # pycocotools directly, with xywh computed independently from the xyxy results
    direct = []
    for res, image_id in zip(results, ids):
        for (x1, y1, x2, y2), s, l in zip(res["boxes"].tolist(), res["scores"].tolist(), res["labels"].tolist()):
            direct.append({"image_id": image_id, "category_id": l, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(direct), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert 0.2 < ours["AP"] < 1.0
    for i, key in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
        assert ours[key] == pytest.approx(ev.stats[i], abs=2e-4), key  # dets are rounded to 1e-3 px
    assert coco_evaluate(gt, []) == {k: 0.0 for k in ours}
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_evaluate(gt, [{**dets[0], "image_id": 999}])
    assert gather_to_rank0(dets) == dets  # no process group: identity


def test_coco_evaluate_quiet_under_a_patched_print(monkeypatch, capsys):
    """A Ray Train worker's ``print`` logs every call whatever ``sys.stdout`` is (Ray patches
    ``builtins.print``): pycocotools' ~20 progress and summary lines reached the job log of
    every evaluation. They go to the debug log now; prints to other files pass through."""
    import builtins
    import sys

    logged = []

    def patched(*objects, sep=" ", end="\n", file=None, flush=False):  # what Ray installs
        logged.append(sep.join(map(str, objects)))

    monkeypatch.setattr(builtins, "print", patched)
    rng = np.random.default_rng(1)
    gt = _gt(rng)
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"]]
    from dino_scale.engine import evaluate as evaluate_mod

    captured = []
    monkeypatch.setattr(evaluate_mod.log, "debug", lambda msg, *args: captured.append(msg % args))
    assert coco_evaluate(gt, dets)["AP"] == pytest.approx(1.0)
    assert logged == [] and capsys.readouterr().out == ""
    assert "Average Precision" in captured[0]  # kept in the debug log
    assert builtins.print is patched  # restored
    with evaluate_mod._prints_to(io.StringIO()) as sink:
        print("to stderr", file=sys.stderr)
        print("to sink")
    assert sink.getvalue() == "to sink\n" and logged == ["to stderr"]  # passed to the print in place


def test_flip_stays_inside_the_unpadded_region():
    images = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    masks = torch.zeros(2, 4, 6, dtype=torch.bool)
    masks[1, :, 4:] = True
    masks[1, 3, :] = True
    flipped = _flip_valid(images, masks)
    assert torch.equal(flipped[0], images[0].flip(-1))
    assert torch.equal(flipped[1, :, :3, :4], images[1, :, :3, :4].flip(-1))
    assert torch.equal(flipped[1, :, :, 4:], images[1, :, :, 4:]) and torch.equal(flipped[1, :, 3], images[1, :, 3])
    assert torch.equal(_flip_valid(flipped, masks), images)


def test_tta_views_merged():
    cfg = preset("tiny")
    torch.manual_seed(0)
    model, _, post = build_dino(cfg.model)
    images = torch.randn(2, 3, 64, 96)
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[1, :, 80:] = True
    orig = torch.tensor([[128, 192], [128, 160]])
    plain = predict_batch(model, post, images, masks, orig)
    tta = predict_batch(model, post, images, masks, orig, tta=True, tta_scale_factors=(1.0, 1.25),
                        num_select=cfg.model.num_select)
    assert len(tta) == 2 and all(r["scores"].shape == (cfg.model.num_select,) for r in tta)
    for res, (h, w) in zip(tta, orig.tolist()):
        assert torch.all(res["scores"][:-1] >= res["scores"][1:])  # merged and sorted
        b = res["boxes"]
        assert float(b[:, [0, 2]].min()) >= -1e-3 and float(b[:, [0, 2]].max()) <= w + 1e-3
    # the best merged score is at least the best single-view score
    assert all(float(t["scores"][0]) >= float(p["scores"][0]) - 1e-6 for t, p in zip(tta, plain))


def test_evaluate_batches_normalizes_uint8_batches_where_it_runs():
    """A uint8 batch (as collate gives it) is normalized on the evaluation device, its padding
    zeroed: the detections are those of the batch normalized on the host beforehand."""
    from dino_scale.data.transforms import normalize_batch

    cfg = preset("tiny")
    torch.manual_seed(0)
    model, _, post = build_dino(cfg.model)
    model.eval()
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8, generator=gen)
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[1, :, 80:] = True
    images[1, :, :, 80:] = 0
    targets = [{"image_id": 7, "orig_size": torch.tensor([128, 192])},
               {"image_id": 9, "orig_size": torch.tensor([128, 160])}]
    raw = evaluate_batches(model, post, [(images, masks, targets)], torch.device("cpu"))
    ref = evaluate_batches(model, post, [(normalize_batch(images, masks), masks, targets)], torch.device("cpu"))
    assert len(raw) == len(ref) == 2 * cfg.model.num_select and {d["image_id"] for d in raw} == {7, 9}
    assert raw == ref
    assert images.dtype == torch.uint8 and int(images.max()) > 200  # the caller's batch is left as it was


def test_unevaluated_images_are_the_ground_truth_images_no_worker_saw():
    """Images the data layer dropped (undecodable) are the ground truth's ids missing from the
    gathered ids of the evaluated ones; order and repeats of the gathered ids do not matter."""
    from dino_scale.engine.evaluate import unevaluated_images

    gt = {"images": [{"id": i} for i in (7, 3, 12, 5)], "annotations": [], "categories": []}
    assert unevaluated_images(gt, [5, 3, 5, 12, 7]) == []
    assert unevaluated_images(gt, [12, 3]) == [5, 7]
    assert unevaluated_images(gt, []) == [3, 5, 7, 12]


class _RectangleFinder(torch.nn.Module):
    """A perfect detector of the bright rectangles (channel 0 > 0.5) of its input: one query per
    rectangle (one per column band of the unpadded region), class 1, its score by the box's
    height, and a little higher the further right it is (views differ in their scores)."""

    def __init__(self, bands: int):
        super().__init__()
        self.bands = bands
        self.p = torch.nn.Parameter(torch.zeros(1))  # predict_batch reads the parameters' dtype

    def forward(self, images, masks):
        B = images.shape[0]
        logits = torch.full((B, self.bands, 3), -10.0)
        boxes = torch.full((B, self.bands, 4), 0.5)
        for i in range(B):
            h, w = int((~masks[i, :, 0]).sum()), int((~masks[i, 0, :]).sum())
            on = images[i, 0, :h, :w] > 0.5
            for q in range(self.bands):  # band q: columns [q*w/bands, (q+1)*w/bands)
                ys, xs = torch.nonzero(on[:, q * w // self.bands:(q + 1) * w // self.bands], as_tuple=True)
                x1, x2 = xs.min().item() + q * w // self.bands, xs.max().item() + 1 + q * w // self.bands
                y1, y2 = ys.min().item(), ys.max().item() + 1
                boxes[i, q] = torch.tensor([(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h])
                logits[i, q, 1] = 4.0 * (y2 - y1) / h + 0.2 * (x1 + x2) / 2 / w
        return {"pred_logits": logits, "pred_boxes": boxes}


def test_tta_of_a_perfect_detector_keeps_ap_one():
    """Each view finds every object once; merging the views must not turn the other views' copies
    into false positives ranked above true positives (merged without suppression, the two views'
    copies of each object gave AP 0.79)."""
    images = torch.zeros(2, 3, 40, 64)
    masks = torch.ones(2, 40, 64, dtype=torch.bool)
    masks[0], masks[1, :32, :48] = False, False
    gt_boxes = {0: [(4, 10, 20, 30), (36, 5, 60, 25)], 1: [(2, 3, 14, 9), (30, 20, 44, 31)]}  # x1,y1,x2,y2
    for i, rects in gt_boxes.items():
        for x1, y1, x2, y2 in rects:
            images[i, :, y1:y2, x1:x2] = 1.0
    orig = torch.tensor([[80, 128], [64, 96]])  # the annotated sizes: 2x the input
    gt = {"images": [{"id": 5, "width": 128, "height": 80}, {"id": 2 ** 62 + 3, "width": 96, "height": 64}],
          "annotations": [], "categories": [{"id": 1, "name": "rect"}, {"id": 2, "name": "other"}]}
    for img, rects in zip(gt["images"], gt_boxes.values()):
        for x1, y1, x2, y2 in rects:
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": img["id"], "category_id": 1,
                                      "bbox": [2 * x1, 2 * y1, 2 * (x2 - x1), 2 * (y2 - y1)],
                                      "area": 4.0 * (x2 - x1) * (y2 - y1), "iscrowd": 0})
    ids = [img["id"] for img in gt["images"]]
    model, post = _RectangleFinder(bands=2), PostProcess(num_select=10)
    plain = coco_evaluate(gt, to_coco_detections(predict_batch(model, post, images, masks, orig), ids))
    assert plain["AP"] == pytest.approx(1.0)
    tta = predict_batch(model, post, images, masks, orig, tta=True, tta_scale_factors=(1.0,), num_select=10)
    assert coco_evaluate(gt, to_coco_detections(tta, ids))["AP"] == pytest.approx(1.0)


def _nan_model_results(nan_images: set[int]):
    """PostProcess results of a 2-image batch: image i outputs NaN everywhere when i is in
    ``nan_images``, else one box on its object (the ground truth of :func:`_two_images_gt`)."""
    logits = torch.full((2, 10, 2), -5.0)
    logits[:, 0, 1] = 5.0
    boxes = torch.tensor([0.25, 0.3125, 0.3, 0.375]).repeat(2, 10, 1)  # xywh 10,10,30,30 of 100x80
    for i in nan_images:
        logits[i], boxes[i] = float("nan"), float("nan")
    return PostProcess(num_select=5)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[80, 100]] * 2))


def _two_images_gt():
    return {"images": [{"id": 1, "width": 100, "height": 80}, {"id": 2, "width": 100, "height": 80}],
            "annotations": [{"id": k, "image_id": k, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900.0,
                             "iscrowd": 0} for k in (1, 2)],
            "categories": [{"id": 1, "name": "a"}]}


def test_non_finite_detections_are_dropped_and_counted_never_scored():
    """pycocotools matches a NaN box to every object (``iou < threshold`` is False for NaN), so a
    model whose outputs were all NaN (diverged, fp16 overflow) scored AP 0.75 here, and one with
    NaN outputs on one image of two AP50 0.75 instead of 0.5. Non-finite detections are now a
    counted, logged skip; when nothing finite is left the AP is NaN (no measurement), not 0."""
    gt = _two_images_gt()
    all_nan = coco_evaluate(gt, to_coco_detections(_nan_model_results({0, 1}), [1, 2]))
    assert all(np.isnan(all_nan[k]) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")), all_nan
    assert all_nan["detections_nonfinite"] == 10
    one_nan = coco_evaluate(gt, to_coco_detections(_nan_model_results({0}), [1, 2]))
    finite_only = coco_evaluate(gt, to_coco_detections(_nan_model_results({0}), [1, 2])[5:])
    assert one_nan["detections_nonfinite"] == 5 and finite_only["detections_nonfinite"] == 0
    assert one_nan["AP50"] == pytest.approx(0.5, abs=0.01)  # image 1's object is a miss
    for k in ("AP", "AP50", "AP75", "APs"):
        assert one_nan[k] == finite_only[k], k
    assert coco_evaluate(gt, to_coco_detections(_nan_model_results(set()), [1, 2]))["AP"] == pytest.approx(1.0)


def test_an_evaluation_that_saw_no_image_has_no_ap():
    """Every val image skipped by the data layer (files missing: a folder converted without
    embedded images, read where its image root is not) gave AP 0.0 and a warning: a finished
    evaluation whose AP a registry takes as the first champion's. With no image evaluated the
    metrics are NaN (no measurement); with some evaluated, the rest count as misses as before."""
    from dino_scale.engine.evaluate import val_metrics

    gt = _two_images_gt()
    none_seen = val_metrics(gt, [], [])
    assert all(np.isnan(none_seen[k]) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")), none_seen
    assert none_seen["images_unevaluated"] == 2
    dets = to_coco_detections(_nan_model_results(set()), [1, 2])
    one_seen = val_metrics(gt, dets[5:], [2])
    assert one_seen["images_unevaluated"] == 1 and one_seen["AP50"] == pytest.approx(0.5, abs=0.01)
    both = val_metrics(gt, dets, [2, 1])
    assert both["images_unevaluated"] == 0 and both["AP"] == pytest.approx(1.0)
    assert val_metrics(gt, [], [1, 2])["AP"] == 0.0  # images seen, nothing detected: AP 0 is the measurement


@pytest.mark.parametrize("overrides, key", [
    (["eval.batch_size=0"], "eval.batch_size"),
    (["eval.tta=true", "eval.tta_scales=[]"], "eval.tta_scales"),
    (["eval.tta=true", "eval.tta_scales=[0]"], "eval.tta_scales"),
    (["eval.tta=true", "eval.tta_scales=[256, -256]"], "eval.tta_scales"),
])
def test_bad_eval_settings_refused_before_the_run(overrides, key, tmp_path):
    """Evaluation settings were not checked: a training run trained to the end and then failed in
    its final evaluation, in every worker, before its final checkpoint was reported ('merge_tta
    needs at least one result' for an empty eval.tta_scales, 'input too small' for a 0 or
    negative scale, Ray's error for eval.batch_size 0). Now a ConfigError naming the key in the
    pre-run training checks and before an evaluation-only run reads data or starts Ray."""
    from dino_scale.config import ConfigError
    from dino_scale.engine import evaluate_weights
    from dino_scale.engine.evaluate import check_eval_config
    from dino_scale.engine.trainer import check_training_config

    cfg = preset("tiny", overrides)
    pattern = key.replace(".", r"\.")
    for check in (check_eval_config, check_training_config):
        with pytest.raises(ConfigError, match=pattern):
            check(cfg)
    with pytest.raises(ConfigError, match=pattern):  # before the (absent) data and weights are looked at
        evaluate_weights(cfg, str(tmp_path / "no-weights"), str(tmp_path / "no-val"), tmp_path / "work", "bad-eval")
    for name in ("tiny", "r50_4scale", "swinl_4scale"):  # the shipped settings pass, with TTA too
        for extra in ([], ["eval.tta=true", "eval.tta_scales=[640, 800, 960]"]):
            check_eval_config(preset(name, extra))
            check_training_config(preset(name, extra))


def test_a_ground_truth_without_objects_has_no_ap():
    """A val set whose images hold no (non-crowd) object: pycocotools reports every metric as -1,
    which went on as AP -1 (logged, tagged on the registered version, and taken by the registry
    as a measured AP: the first version of a model became its champion with it). It is NaN now,
    as for an evaluation that saw no image."""
    from dino_scale.engine.evaluate import val_metrics

    gt = {**_two_images_gt(), "annotations": []}
    dets = to_coco_detections(_nan_model_results(set()), [1, 2])
    empty = val_metrics(gt, dets, [1, 2])
    assert all(np.isnan(empty[k]) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")), empty
    crowd_only = {**_two_images_gt()}
    crowd_only["annotations"] = [{**a, "iscrowd": 1} for a in crowd_only["annotations"]]
    assert np.isnan(val_metrics(crowd_only, dets, [1, 2])["AP"])
    sizes = val_metrics(_two_images_gt(), dets, [1, 2])  # objects of one size: the others stay -1
    assert sizes["AP"] == pytest.approx(1.0) and sizes["APm"] == -1.0 and sizes["APl"] == -1.0
