"""DINO augmentation on uint8 images with torchvision.transforms.v2 and tv_tensors.

Train (the DETR/DINO recipe): horizontal flip (p=0.5); then with p=0.5 either resize
the short side to one of ``train_scales`` (long side <= ``train_max_size``), or resize
to one of ``crop_resize_scales``, random-crop a ``crop_size_range`` window, and resize
to one of ``train_scales``. Eval: short side ``eval_size``, long side <= ``eval_max_size``.
All sizes are multiplied by ``scale_factor`` (1.5 for the fine-tuning recipe).

Geometry stays in uint8 (``tv_tensors.Image`` + ``tv_tensors.BoundingBoxes``);
normalization is left to the consumer, usually on the GPU: :func:`normalize_batch`.
Random draws come from a generator seeded by ``(seed, epoch, image_id)``, so a
sample's augmentation does not depend on worker count or order.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from dino_scale.config_checks import check_augmentation, scaled_size

from .decode import ImageDecodeError, decode_image, sizes_agree
from .integrity import damage_detail, record_damage

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DetectionTransform", "check_augmentation", "dino_resize_size",
           "normalize_batch", "sample_rng"]

log = logging.getLogger(__name__)
CROP_BRANCH_PIXEL_LIMIT = 40_000_000  # ~1:110 at a 600-pixel short side (COCO's most elongated image is ~1:8)
_tie_warned = False  # the one warning per process about EXIF ties under data.exif_orientation=auto

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dino_resize_size(hw: tuple[int, int], size: int, max_size: Optional[int] = None) -> tuple[int, int]:
    """Output (h, w) for "short side = size, long side <= max_size" (DETR's rule, incl. rounding).

    The short side is at least 1 pixel: a strip thinner than ``max_size / (2 * size)`` of its
    length (e.g. 1x4000 at 800/1333) keeps a 1-pixel short side (DETR's rule gives 0, and the
    resize to 0 pixels crashed), so its long side may exceed ``max_size``."""
    h, w = hw
    if max_size is not None:
        lo, hi = float(min(w, h)), float(max(w, h))
        if hi / lo * size > max_size:
            size = max(1, int(round(max_size * lo / hi)))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def sample_rng(seed: int, epoch: int, image_id: int) -> np.random.Generator:
    """The generator of one sample's augmentation (independent of order and workers)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(image_id) & 0xFFFFFFFFFFFFFFFF])


@functools.lru_cache(maxsize=16)
def _mean_std(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1,3,1,1) float32 mean and std on ``device``, made once per device (each was a blocking
    host-to-device copy per batch)."""
    return (torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1).to(device),
            torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1).to(device))


def normalize_batch(images: torch.Tensor, masks: Optional[torch.Tensor] = None,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float32 ImageNet-normalized on the input's device.

    With ``masks`` (B,H,W; True on padding) the padding is set to 0 after normalizing,
    as in the reference (which pads normalized images with zeros).
    """
    # a float32 input: .float() is the input itself, which div_ would overwrite (the caller's tensor)
    x = images.div(255.0) if images.dtype == torch.float32 else images.float().div_(255.0)
    m, s = _mean_std(tuple(mean), tuple(std), x.device)
    x = x.sub_(m).div_(s)
    if masks is not None:
        x = x.masked_fill(masks[:, None], 0.0)
    return x


def _inside(boxes: tv_tensors.BoundingBoxes) -> tuple[tv_tensors.BoundingBoxes, torch.Tensor]:
    """``boxes`` (n, 4) XYXY clamped to their canvas, and the (n,) mask of those with area left.
    Converted boxes lie inside their image already (clipped at conversion): a no-op for them."""
    boxes = F.clamp_bounding_boxes(boxes)
    return boxes, (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


class DetectionTransform:
    """Record -> sample. ``__call__(record, epoch)`` returns a dict:

    - ``image`` uint8 (3, H, W) tensor, resized/augmented
    - ``boxes`` float32 (n, 4) normalized cx, cy, w, h (crowd boxes removed)
    - ``labels`` int64 (n,) raw category ids
    - ``image_id`` int; ``orig_size`` int64 (2,) annotated (h, w); ``size`` int64 (2,) (h, w)

    ``record`` is a dict as from :func:`~.records.iter_records`: ``image`` bytes, or ``None``
    and ``file_name`` found under ``record["image_root"]`` (set per dataset folder by
    :func:`~.loader.iter_rooted_records`), else under ``image_root``; ``width``/``height``
    the annotated size; ``boxes`` (n,4) x,y,w,h pixels; ``category_ids`` (n,); optional
    ``iscrowd`` (n,). Raises ``ImageDecodeError`` (a counted skip for the loaders) when the
    record does not match its checksums (``damaged``: the shard changed after conversion), the
    file is missing or unreadable, the bytes do not decode, the pixels are not a uniform
    rescale of the annotated size, or (with ``category_ids``, the ids of the dataset's
    manifest) the record holds a category id the manifest does not list: its label would
    reach the loss outside the class head that was sized from the manifest.

    EXIF orientation follows ``cfg.exif_orientation`` (:mod:`.decode`). With ``"auto"``, an image
    whose tag keeps its size (a tie: the sizes cannot tell the stored grid from the upright one)
    is turned upright, its id added to ``exif_ties`` (once per image) and logged: a warning the
    first time in the process, naming the setting, then at debug level.
    """

    def __init__(self, cfg, train: bool = True, image_root: Optional[str] = None,
                 category_ids: Optional[Iterable[int]] = None):
        check_augmentation(cfg)  # here, where the dataset is built: not in a sample's task mid-run
        f = float(cfg.scale_factor)
        self.train, self.seed = train, int(cfg.seed)
        self.scales = [scaled_size(s, f) for s in cfg.train_scales]
        self.max_size = scaled_size(cfg.train_max_size, f)
        self.crop_resize = [scaled_size(s, f) for s in cfg.crop_resize_scales]
        self.crop_range = (scaled_size(cfg.crop_size_range[0], f), scaled_size(cfg.crop_size_range[1], f))
        self.eval_size, self.eval_max = scaled_size(cfg.eval_size, f), scaled_size(cfg.eval_max_size, f)
        self.image_root = image_root
        self.category_ids = None if category_ids is None else frozenset(int(c) for c in category_ids)
        self.exif_orientation = str(getattr(cfg, "exif_orientation", "auto"))
        self.exif_ties: set[int] = set()  # ids of images decoded upright by a tie ("auto")
        self._new_ties: list[int] = []  # those not yet handed on (take_new_exif_ties)

    def _note_tie(self, image_id: int, orientation: int) -> None:
        global _tie_warned
        if image_id in self.exif_ties:
            return
        self.exif_ties.add(image_id)
        self._new_ties.append(image_id)
        if _tie_warned:
            log.debug("image id %s: EXIF orientation %d keeps its size: turned upright (auto)", image_id, orientation)
            return
        _tie_warned = True
        log.warning("image id %s has EXIF orientation %d, which keeps its size: its annotated size cannot tell "
                    "whether the boxes lie on the stored or the upright pixels, and data.exif_orientation=auto "
                    "turns it upright (further such images are logged at debug level). Set "
                    "data.exif_orientation=stored for COCO/Objects365 (the official DINO's reading) or =upright "
                    "for images annotated by tools that apply EXIF (labelme, Label Studio, Roboflow)",
                    image_id, orientation)

    def take_new_exif_ties(self) -> list[int]:
        """Ids added to ``exif_ties`` since the last call (for a counter shared across processes)."""
        new, self._new_ties = self._new_ties, []
        return new

    # -- geometry ------------------------------------------------------------------
    @staticmethod
    def _resize(img, boxes, size: int, max_size: Optional[int]):
        h, w = img.shape[-2:]
        oh, ow = dino_resize_size((h, w), size, max_size)
        if (oh, ow) == (h, w):
            return img, boxes
        return F.resize(img, [oh, ow], antialias=True), F.resize(boxes, [oh, ow])

    def augment(self, img: tv_tensors.Image, boxes: tv_tensors.BoundingBoxes, rng: np.random.Generator):
        """Train geometry; returns (image, boxes, keep) with ``keep`` the surviving box mask."""
        n = boxes.shape[0]
        keep = torch.ones(n, dtype=torch.bool)
        if rng.random() < 0.5:
            img, boxes = F.horizontal_flip(img), F.horizontal_flip(boxes)
        if rng.random() < 0.5:
            img, boxes = self._resize(img, boxes, self.scales[rng.integers(len(self.scales))], self.max_size)
            return img, *_inside(boxes)
        img, boxes = self._resize(img, boxes, self.crop_resize[rng.integers(len(self.crop_resize))], None)
        h, w = img.shape[-2:]
        lo, hi = self.crop_range
        cw = int(rng.integers(min(lo, w), min(w, hi) + 1))
        ch = int(rng.integers(min(lo, h), min(h, hi) + 1))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        img, boxes = F.crop(img, top, left, ch, cw), F.crop(boxes, top, left, ch, cw)
        boxes, keep = _inside(boxes)
        img, boxes = self._resize(img, boxes, self.scales[rng.integers(len(self.scales))], self.max_size)
        return img, boxes, keep

    # -- record -> sample ----------------------------------------------------------
    def load(self, record: dict[str, Any]) -> np.ndarray:
        data = record.get("image")
        if data is None:
            from .image_paths import resolve_image_path
            try:  # the lookup stats the file too: EACCES, ENAMETOOLONG, EIO are counted skips
                path = resolve_image_path(record.get("image_root") or self.image_root, record["file_name"])
                data = path.read_bytes() if path is not None else None
            except OSError as e:  # permissions, a failing network filesystem: a counted skip
                raise ImageDecodeError("unreadable", f"{record['file_name']}: {e}") from None
            if path is None:
                raise ImageDecodeError("missing_file", str(record["file_name"]))
        image_id = int(record["image_id"])
        on_tie = (lambda o: self._note_tie(image_id, o)) if self.exif_orientation == "auto" else None
        return decode_image(data, expected_size=(int(record["width"]), int(record["height"])),
                            exif_orientation=self.exif_orientation, on_tie=on_tie)

    def check_crop_branch_size(self, record: dict[str, Any]) -> None:
        """``ImageDecodeError("extreme_aspect")`` for a training image the crop branch's first
        resize (short side to ``crop_resize_scales``, no long-side cap, as in the official DINO)
        would make larger than :data:`CROP_BRANCH_PIXEL_LIMIT` pixels: a 1x4000 strip became
        400x1,600,000 (1.9 GB as uint8, more while resizing) and could kill a data worker. Decided
        from the annotated size, before decoding, so the image is skipped in every epoch."""
        if not self.train:
            return
        h, w = int(record["height"]), int(record["width"])
        oh, ow = dino_resize_size((h, w), max(self.crop_resize), None)
        if oh * ow > CROP_BRANCH_PIXEL_LIMIT:
            raise ImageDecodeError("extreme_aspect", f"{w}x{h} would be resized to {ow}x{oh} by the crop branch "
                                   f"(over {CROP_BRANCH_PIXEL_LIMIT:,} pixels)")

    def check_categories(self, record: dict[str, Any]) -> None:
        """``ImageDecodeError("unknown_category")`` when ``record`` holds a category id that
        ``category_ids`` lacks (no check without ``category_ids``)."""
        if self.category_ids is None:
            return
        ids = np.asarray(record["category_ids"] if record["category_ids"] is not None else [], np.int64)
        unknown = sorted({int(c) for c in np.unique(ids)} - self.category_ids)
        if unknown:
            raise ImageDecodeError("unknown_category", f"category ids {unknown[:10]} are not among the "
                                   f"{len(self.category_ids)} categories of the dataset's manifest")

    @staticmethod
    def check_integrity(record: dict[str, Any]) -> None:
        """``ImageDecodeError("damaged")`` when ``record``'s labels or embedded image bytes do
        not match the checksums written at conversion (:func:`~.integrity.record_damage`)."""
        what = record_damage(record)
        if what:
            raise ImageDecodeError("damaged", f"{damage_detail(what)}; `dino-scale check-data <folder>` lists "
                                   f"every such record")

    @staticmethod
    def check_lists(record: dict[str, Any]) -> None:
        """``ImageDecodeError("damaged")`` when ``record``'s lists disagree in length (4 box
        values and, where given, one crowd flag per category id): only a damaged shard, or one
        written by another tool, holds such a record (its checksum is checked first)."""
        n = np.asarray(record["category_ids"] if record["category_ids"] is not None else []).size
        boxes = np.asarray(record["boxes"] if record["boxes"] is not None else []).size
        crowd = record.get("iscrowd")
        if boxes != 4 * n or (crowd is not None and np.asarray(crowd).size != n):
            raise ImageDecodeError("damaged", f"its lists disagree: {boxes} box values, {n} category ids"
                                   + ("" if crowd is None else f", {np.asarray(crowd).size} crowd flags"))

    @staticmethod
    def check_fields(record: dict[str, Any]) -> None:
        """``ImageDecodeError("damaged")`` for fields no converted record holds (the converter
        refuses or drops them; a shard written by another tool, without checksums, may): a width
        or height that is not a positive integer (a division by zero in the resize), a file record
        without a file name, a box that is not finite or has no area (NaN targets in the loss)."""
        def bad(detail: str) -> ImageDecodeError:
            return ImageDecodeError("damaged", f"{detail}: only a shard written by another tool holds such a "
                                    f"record (`dino-scale prepare-data` drops or refuses it)")

        for key in ("width", "height"):
            value = record.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise bad(f"{key} {value!r} is not a positive integer")
        name = record.get("file_name")
        if record.get("image") is None and (not isinstance(name, str) or not name):
            raise bad(f"no embedded image and file_name {name!r}")
        if record["boxes"] is not None and len(record["boxes"]):
            xywh = np.asarray(record["boxes"], dtype=np.float64).reshape(-1, 4)
            crowd = record.get("iscrowd")
            if crowd is not None:
                xywh = xywh[~np.asarray(crowd, dtype=bool).reshape(-1)]
            wrong = ~np.isfinite(xywh).all(1) | (xywh[:, 2] <= 0) | (xywh[:, 3] <= 0)
            if wrong.any():
                raise bad(f"{int(wrong.sum())} box(es) not finite or without area (first: "
                          f"{xywh[wrong][0].tolist()})")

    def __call__(self, record: dict[str, Any], epoch: int = 0) -> dict[str, Any]:
        self.check_integrity(record)  # changed labels or bytes would train silently on other data
        self.check_lists(record)
        self.check_fields(record)
        self.check_categories(record)  # before decoding: the image would be dropped anyway
        self.check_crop_branch_size(record)
        arr = self.load(record)
        H, W = arr.shape[:2]
        rh, rw = int(record["height"]), int(record["width"])
        xywh = np.asarray(record["boxes"], dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(record["category_ids"], dtype=np.int64).reshape(-1)
        crowd = np.asarray(record.get("iscrowd", np.zeros(len(labels), bool)), dtype=bool).reshape(-1)
        xywh, labels = xywh[~crowd], labels[~crowd]
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        if (H, W) != (rh, rw):  # a uniformly rescaled copy: follow the pixels; else not this image
            if not sizes_agree((W, H), (rw, rh)):
                raise ImageDecodeError("size_mismatch", f"pixels {W}x{H}, annotated {rw}x{rh}"
                                       + ("" if self.exif_orientation == "auto" else
                                          f" (data.exif_orientation={self.exif_orientation})"))
            xyxy = xyxy * np.array([W / rw, H / rh, W / rw, H / rh], np.float32)
        img = tv_tensors.Image(torch.from_numpy(arr).permute(2, 0, 1))
        boxes = tv_tensors.BoundingBoxes(torch.from_numpy(xyxy), format="XYXY", canvas_size=(H, W))
        if self.train:
            img, boxes, keep = self.augment(img, boxes, sample_rng(self.seed, epoch, int(record["image_id"])))
        else:
            img, boxes = self._resize(img, boxes, self.eval_size, self.eval_max)
            boxes, keep = _inside(boxes)
        h, w = img.shape[-2:]
        b = boxes.as_subclass(torch.Tensor)[keep]
        cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0],
                              b[:, 3] - b[:, 1]], 1) / torch.tensor([w, h, w, h], dtype=torch.float32)
        return {
            "image": img.as_subclass(torch.Tensor),  # may be channels-last strided; collate copies
            "boxes": cxcywh.float().reshape(-1, 4),
            "labels": torch.from_numpy(labels)[keep],
            "image_id": int(record["image_id"]),
            "orig_size": torch.tensor([rh, rw], dtype=torch.int64),
            "size": torch.tensor([h, w], dtype=torch.int64),
        }
