"""DINO augmentation geometry, seeding, collate and normalization."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dino_scale.config import DataConfig, preset
from dino_scale.data.collate import collate, collate_numpy_batch
from dino_scale.data.transforms import DetectionTransform, dino_resize_size, normalize_batch


def _record(w=200, h=150, box=(40, 30, 60, 50), image_id=7, crowd=False):
    arr = np.zeros((h, w, 3), np.uint8)
    x, y, bw, bh = box
    arr[y:y + bh, x:x + bw] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    boxes = [list(box)] + ([[0, 0, 20, 20]] if crowd else [])
    return {"image_id": image_id, "image": buf.getvalue(), "width": w, "height": h, "file_name": "x.png",
            "boxes": np.array(boxes, np.float32), "category_ids": np.array([3] + ([4] if crowd else [])),
            "iscrowd": np.array([False] + ([True] if crowd else []))}


def _white_box(img: torch.Tensor) -> np.ndarray:
    """Normalized cx,cy,w,h of the white rectangle in a (3,H,W) uint8 image."""
    mask = img[0].numpy() > 127
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    x1, x2, y1, y2 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    return np.array([(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h])


def test_data_resize_rule_matches_reference():
    assert dino_resize_size((480, 640), 800, 1333) == (800, 1066)
    assert dino_resize_size((480, 640), 480, 1333) == (480, 640)
    assert dino_resize_size((300, 1200), 800, 1333) == (333, 1332)  # long side capped (int() truncation)
    assert dino_resize_size((640, 480), 512, None) == (682, 512)


def test_data_eval_transform_sizes_and_boxes():
    cfg = DataConfig()
    s = DetectionTransform(cfg, train=False)(_record(crowd=True))
    assert tuple(s["size"].tolist()) == (800, 1066) and tuple(s["orig_size"].tolist()) == (150, 200)
    assert s["image"].dtype == torch.uint8 and tuple(s["image"].shape) == (3, 800, 1066)
    assert s["labels"].tolist() == [3]  # crowd box kept out of the targets
    np.testing.assert_allclose(s["boxes"][0].numpy(), [70 / 200, 55 / 150, 60 / 200, 50 / 150], atol=1e-6)
    np.testing.assert_allclose(s["boxes"][0].numpy(), _white_box(s["image"]), atol=0.01)
    big = DetectionTransform(preset("r50_4scale", ["data.scale_factor=1.5"]).data, train=False)(_record())
    assert tuple(big["size"].tolist()) == (1200, 1600)


def test_scaled_sizes_are_truncated_like_the_official_recipe():
    """The fine-tuning recipe's ``data_aug_scale_overlap`` 1.5 truncates each size (``int(i * 1.5)``):
    the longest side is at most 1999 (rounded, it was 2000: images over ~1.67:1 came out 1 px larger)."""
    t = DetectionTransform(preset("r50_4scale", ["data.scale_factor=1.5"]).data, train=True)
    assert (t.max_size, t.eval_size, t.eval_max) == (1999, 1200, 1999)
    assert t.scales == [720, 768, 816, 864, 912, 960, 1008, 1056, 1104, 1152, 1200]
    assert t.crop_resize == [600, 750, 900] and t.crop_range == (576, 900)
    long = DetectionTransform(preset("r50_4scale", ["data.scale_factor=1.5"]).data, train=False)(
        _record(w=640, h=360))
    assert tuple(long["size"].tolist()) == (1124, 1998)  # the official size (was 1125 x 2000)


def test_data_train_boxes_follow_pixels_and_sizes_allowed():
    cfg = preset("tiny").data
    t = DetectionTransform(cfg, train=True)
    allowed = set(cfg.train_scales)
    seen_flip = seen_crop = False
    for epoch in range(24):
        s = t(_record(), epoch=epoch)
        h, w = s["size"].tolist()
        # the short side is a train scale unless the long side was capped (to the max, or one
        # pixel short where the short side's rounding leaves it)
        assert min(h, w) in allowed or max(h, w) >= cfg.train_max_size - 1, (h, w)
        assert max(h, w) <= cfg.train_max_size
        if len(s["labels"]):
            np.testing.assert_allclose(s["boxes"][0].numpy(), _white_box(s["image"]), atol=0.03)
            seen_flip |= float(s["boxes"][0, 0]) > 0.5
        else:  # cropped away: then the image holds no white pixels either
            assert (s["image"][0] > 127).sum() == 0
        seen_crop |= abs(w / h - 200 / 150) > 0.02
    assert seen_flip and seen_crop


def test_data_train_seeded_per_epoch_and_image():
    t = DetectionTransform(preset("tiny").data, train=True)
    a, b = t(_record(), epoch=1), t(_record(), epoch=1)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
    outs = {tuple(t(_record(), epoch=e)["size"].tolist()) + tuple(t(_record(), epoch=e)["boxes"].flatten().tolist())
            for e in range(8)}
    assert len(outs) > 3  # draws change with the epoch
    per_image = {tuple(t(_record(image_id=i), epoch=1)["size"].tolist())
                 + tuple(t(_record(image_id=i), epoch=1)["boxes"].flatten().tolist()) for i in range(8)}
    assert len(per_image) > 3  # and with the image within one epoch


def test_data_collate_pads_and_masks():
    t = DetectionTransform(preset("tiny").data, train=False)
    s1, s2 = t(_record(200, 150)), t(_record(120, 160, box=(10, 10, 30, 30), image_id=8))
    images, masks, targets = collate([s1, s2])
    H = max(s1["size"][0], s2["size"][0]).item()
    W = max(s1["size"][1], s2["size"][1]).item()
    assert images.shape == (2, 3, H, W) and images.dtype == torch.uint8 and masks.shape == (2, H, W)
    for i, s in enumerate((s1, s2)):
        h, w = s["size"].tolist()
        assert not masks[i, :h, :w].any() and masks[i].sum() == H * W - h * w
        assert torch.equal(images[i, :, :h, :w], s["image"])
        assert targets[i]["image_id"].item() == s["image_id"] and targets[i]["boxes"].shape == (1, 4)
    images32, masks32, _ = collate([s1, s2], pad_multiple=32)
    assert images32.shape[-1] % 32 == 0 and images32.shape[-2] % 32 == 0
    def objects(key):  # a Ray Data numpy batch holds variable-shaped columns as object arrays
        out = np.empty(2, dtype=object)
        out[0], out[1] = s1[key].numpy(), s2[key].numpy()
        return out

    rows = {"image": objects("image"), "boxes": objects("boxes"), "labels": objects("labels"),
            "image_id": np.array([7, 8]), "orig_size": np.stack([s1["orig_size"].numpy(), s2["orig_size"].numpy()])}
    im2, m2, _ = collate_numpy_batch(rows)
    assert torch.equal(im2, images) and torch.equal(m2, masks)


def test_data_normalize_batch():
    images = torch.full((1, 3, 4, 5), 255, dtype=torch.uint8)
    masks = torch.zeros(1, 4, 5, dtype=torch.bool)
    masks[:, :, 3:] = True
    x = normalize_batch(images, masks)
    assert x.dtype == torch.float32
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224,
                                                      (1 - 0.406) / 0.225], rtol=1e-6)
    assert (x[0, :, :, 3:] == 0).all()


def test_data_collate_takes_chw_only_and_says_so():
    """collate guessed the layout from the shape: HWC when the first axis was not 3, so an HWC
    image 3 rows high, (3, W, 3), was read as CHW (W rows, 3 columns) while other HWC images were
    permuted. CHW only now, whatever the shape; HWC is refused with what to do."""
    s = DetectionTransform(preset("tiny").data, train=False)(_record(200, 150))
    images, masks, _ = collate([{**s, "image": torch.zeros(3, 50, 3, dtype=torch.uint8)}])
    assert images.shape == (1, 3, 50, 3)  # CHW: 50 rows, 3 columns
    with pytest.raises(ValueError, match=r"image of sample 7 must be CHW \(3, H, W\), got shape .* \(HWC\?"):
        collate([{**s, "image": s["image"].permute(1, 2, 0)}])


def test_data_collate_refuses_no_samples():
    with pytest.raises(ValueError, match="at least one sample"):
        collate([])


def test_data_resize_keeps_a_thin_strip_non_empty():
    """DETR's rule resized a strip thinner than max_size / (2 * size) of its length (1x4000 at
    800/1333, 3x4000 at the tiny preset's 256/320) to 0 pixels: the resize raised, which ended
    the evaluation / training data pipeline and `pipelines.predict` (no predictions.json)."""
    from pipelines.predict import preprocess

    assert dino_resize_size((1, 4000), 800, 1333) == (1, 4000)
    assert dino_resize_size((4000, 1), 800, 1333) == (4000, 1)
    assert dino_resize_size((3, 4000), 256, 320) == (1, 1333)
    assert dino_resize_size((2, 4000), 800, 1333) == (1, 2000)  # unchanged where DETR's rule gives > 0
    s = DetectionTransform(preset("tiny").data, train=False)(_record(w=4000, h=3, box=(100, 0, 50, 3)))
    assert tuple(s["size"].tolist()) == (1, 1333) and tuple(s["orig_size"].tolist()) == (3, 4000)
    np.testing.assert_allclose(s["boxes"][0].numpy(), [125 / 4000, 0.5, 50 / 4000, 1.0], atol=1e-5)
    x, mask = preprocess(Image.new("RGB", (4000, 3)), 256, 320)
    assert x.shape == (1, 3, 1, 1333) and mask.shape == (1, 1, 1333) and not mask.any()


@pytest.mark.parametrize("override, key", [
    ("data.crop_size_range=[224,160]", "data.crop_size_range"),  # min/max swapped: 'low >= high' in a task
    ("data.crop_size_range=[160]", "data.crop_size_range"),  # IndexError
    ("data.crop_size_range=[0,10]", "data.crop_size_range"),  # a 0-pixel crop: ZeroDivisionError, epoch 13
    ("data.train_scales=[]", "data.train_scales"),  # 'high <= 0' on every sample
    ("data.crop_resize_scales=[-5]", "data.crop_resize_scales"),
    ("data.scale_factor=0", "data.scale_factor"),
    ("data.scale_factor=nan", "data.scale_factor"),
    ("data.eval_size=0", "data.eval_size"),
    ("data.train_max_size=0", "data.train_max_size"),  # silently: every training image 1 pixel short
    ("data.pad_multiple=-32", "data.pad_multiple"),  # collate: 'The size of tensor a (224) must match'
    ("data.exif_orientation=raw", "data.exif_orientation must be one of auto, stored, upright"),
    ("data.seed=-1", "data.seed must be an integer >= 0"),  # every worker: 'expected non-negative integer'
    ("data.shuffle_buffer=-4", "data.shuffle_buffer must be >= 0"),
])
def test_data_bad_augmentation_settings_refused_before_the_run(override, key):
    """A bad augmentation size failed only where a sample was drawn (in the Ray Data tasks of a
    started run; the crop settings only on the samples that take the crop branch, e.g. epoch 13
    of one image for a 0-pixel crop), or trained on 1-pixel images: now a ConfigError naming the
    key where the transform is built and in the pre-run training checks."""
    from dino_scale.config import ConfigError
    from dino_scale.engine.trainer import check_training_config

    cfg = preset("tiny", [override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        DetectionTransform(cfg.data, train=True)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_training_config(cfg)
    for name in ("tiny", "r50_4scale", "swinl_4scale"):  # the shipped settings pass
        for extra in ([], ["data.scale_factor=1.5", "data.pad_multiple=32"]):
            ok = preset(name, extra)
            DetectionTransform(ok.data, train=True)
            check_training_config(ok)


def test_data_a_training_image_the_crop_branch_would_blow_up_is_a_counted_skip():
    """The crop branch resizes the short side to 400/500/600 with no cap on the long side (as the
    official DINO): a 1x4000 strip became 400x1,600,000 pixels, enough to kill a data worker. Such
    an image is refused (a counted skip, reason extreme_aspect) in training, in every epoch,
    decided before decoding; evaluation caps the long side and still reads it."""
    from dino_scale.data.decode import ImageDecodeError
    from dino_scale.data.transforms import CROP_BRANCH_PIXEL_LIMIT

    cfg = preset("r50_4scale").data  # crop branch resizes to 400/500/600
    strip = _record(w=4000, h=1, box=(100, 0, 50, 1))
    train = DetectionTransform(cfg, train=True)
    for epoch in range(3):
        with pytest.raises(ImageDecodeError, match="extreme_aspect: 4000x1 would be resized to 2400000x600"):
            train(strip, epoch=epoch)
    assert tuple(DetectionTransform(cfg, train=False)(strip)["size"].tolist()) == (1, 4000)
    # an elongated image well inside the limit trains as before (1:100 at 600 -> 36M pixels)
    assert 600 * 60_000 < CROP_BRANCH_PIXEL_LIMIT
    s = train(_record(w=2000, h=100, box=(100, 0, 50, 100)), epoch=0)
    assert s["image"].shape[0] == 3 and s["boxes"].shape[1] == 4


def test_normalize_batch_leaves_a_float_input_as_it_was():
    """A float32 batch was normalized in place: the caller's tensor held the normalized values."""
    from dino_scale.data.transforms import normalize_batch

    images = torch.full((1, 3, 4, 4), 255.0)
    out = normalize_batch(images)
    assert torch.equal(images, torch.full((1, 3, 4, 4), 255.0)) and out.data_ptr() != images.data_ptr()
    assert torch.allclose(out, normalize_batch(images.to(torch.uint8)))


@pytest.mark.parametrize("change,needle", [
    ({"width": 0, "height": 0}, "width 0 is not a positive integer"),
    ({"height": -3}, "height -3"),
    ({"image": None, "file_name": None}, "no embedded image and file_name None"),
    ({"boxes": np.array([[40, 30, 60, 50], [np.nan, 1, 2, 3]], np.float32),
      "category_ids": np.array([3, 3]), "iscrowd": np.array([False, False])}, "1 box(es) not finite"),
    ({"boxes": np.array([[100, 100, -50, 0]], np.float32)}, "without area (first: [100.0, 100.0, -50.0, 0.0])"),
])
def test_data_a_record_no_converter_writes_is_a_counted_skip(change, needle):
    """Shards written by another tool carry no checksums, so nothing checked their fields: a width
    of 0 raised ZeroDivisionError in the resize (a failed Ray task, then the job), a file record
    without a name a TypeError, and NaN or negative boxes reached the loss. Each is now an
    ImageDecodeError ("damaged"), which the loaders count and log as a skip, in every mode."""
    from dino_scale.data.decode import ImageDecodeError

    record = {**_record(), **change}
    for train in (True, False):
        with pytest.raises(ImageDecodeError, match="damaged") as ei:
            DetectionTransform(preset("tiny").data, train=train)(record)
        assert needle in str(ei.value), str(ei.value)
    crowd = _record(crowd=True)  # a crowd box is not trained on: not checked
    crowd["boxes"][1] = [0, 0, 0, 0]
    assert DetectionTransform(preset("tiny").data, train=False)(crowd)["boxes"].shape == (1, 4)


def test_data_boxes_beyond_the_image_are_clipped_in_every_branch():
    """Only the crop branch clamped boxes to the image: a box reaching past the border (from a
    shard written by another tool) gave normalized boxes above 1 in evaluation and in the
    resize branch of training; one wholly outside is dropped."""
    record = _record(w=200, h=150, box=(150, 100, 100, 100))
    record["boxes"] = np.array([[150, 100, 100, 100], [300, 10, 20, 20]], np.float32)
    record["category_ids"], record["iscrowd"] = np.array([3, 4]), np.array([False, False])
    samples = [DetectionTransform(preset("tiny").data, train=False)(record)]
    train = DetectionTransform(preset("tiny").data, train=True)
    samples += [train(record, epoch=e) for e in range(8)]
    assert samples[0]["labels"].tolist() == [3]
    for s in samples:  # (a random crop may cut the first box away too)
        assert s["labels"].tolist() in ([3], []) and s["boxes"].shape == (len(s["labels"]), 4)
        for cx, cy, w, h in s["boxes"].tolist():
            assert 0 <= cx - w / 2 and cx + w / 2 <= 1 + 1e-6 and 0 <= cy - h / 2 and cy + h / 2 <= 1 + 1e-6, s
    assert sum(len(s["labels"]) for s in samples[1:]) >= 4  # the resize branch kept it (clipped)
