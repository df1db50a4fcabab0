"""The inputs of ``pipelines.predict``: which files of the named paths are images to read, which are
passed over (listed as ``skipped``, never lost unsaid), and which are what predict itself wrote
(annotated copies, ``predictions*.json``) and so are no inputs."""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Optional, Sequence

from pipelines import _common as common

MARK = b"dino-scale predict"  # the JPEG comment of an annotated copy: a rerun may replace it
# what a folder is searched for (any case): formats the decoder (dino_scale.data.decode: any mode
# -> RGB, a GIF's first frame) reads with this project's Pillow. Other files of a folder are
# listed in predictions.json ("skipped") and counted in the summary; a file named on the command
# line is read whatever its suffix
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".webp", ".tif", ".tiff",
                  ".gif", ".avif", ".jp2", ".j2k", ".pbm", ".pgm", ".ppm", ".pnm", ".tga"}


def list_images(inputs: Sequence[str], skip_dir: Optional[Path] = None,
                skipped: Optional[list[Path]] = None) -> list[Path]:
    """Image files of ``inputs`` (files, glob patterns the shell left, or folders searched recursively
    for :data:`IMAGE_SUFFIXES`; macOS ``._*`` metadata files are not images). ``skip_dir`` is the
    output folder: where it lies inside a searched folder, all its files are left out (annotated
    copies of an earlier run, its predictions files); where the searched folder is ``skip_dir`` or
    lies inside it (``--out .`` over ``photos/``), only its ``predictions*.json`` are. Annotated
    copies (:func:`_is_copy`) are no photos wherever a folder search or a pattern finds them (in
    ``skip_dir``, or in another run's output folder inside an input: they were read as new photos);
    a copy named as a file is read. An image named more than once (a file and its folder,
    overlapping folders) is listed once, where it first appears. A folder's other files, and the
    folders that could not be read (:func:`_walk`), are appended to ``skipped``, when given: passed
    over, not silently lost."""
    skip = skip_dir.resolve() if skip_dir is not None else None
    files: list[Path] = []
    others: list[Path] = []
    expanded: list[str] = []
    for item in inputs:  # a pattern the shell did not expand (quoted, or a Windows-style shell)
        if not Path(item).expanduser().exists() and glob.has_magic(item):
            matches = sorted(glob.glob(str(Path(item).expanduser()), recursive=True))
            if not matches:
                raise common.UsageError(f"no file matches the image pattern {item}")
            photos = [m for m in matches if not _is_copy(Path(m))]  # "photos/*.jpg" over earlier copies
            if not photos:
                raise common.UsageError(f"every file matching the image pattern {item} is an annotated copy "
                                        f"predict wrote; name one to read it anyway")
            expanded.extend(photos)
        else:
            expanded.append(item)
    for item in expanded:
        p = common.check_path(item, "image path")
        if p.is_dir():
            root = p.resolve()
            # --out is a folder of this input (photos/annotated): none of its files is an input. Was
            # also taken for an input inside --out (`--out .`), whose every file was then dropped unsaid
            out_within = skip is not None and skip != root and skip.is_relative_to(root)
            for f in _walk(p, others):
                where = f.resolve() if skip is not None else None
                if out_within and where.is_relative_to(skip):
                    continue
                # "._x.jpg": macOS metadata beside x.jpg on a copied volume, not an image
                image = f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("._")
                if image and _is_copy(f):
                    continue  # an annotated copy, in --out or in an earlier run's output folder (was read as a photo)
                if where is not None and where.parent == skip and _is_predictions_file(f):
                    continue  # what predict writes into --out besides its copies
                (files if image else others).append(f)
        else:
            files.append(p)
    seen: set[Path] = set()
    files = [f for f in files if not (f.resolve() in seen or seen.add(f.resolve()))]
    others = [f for f in others if not (f.resolve() in seen or seen.add(f.resolve()))]
    if skipped is not None:
        skipped.extend(others)
    if not files:
        what = f" ({_skipped_text(others, '; name such a file to read it anyway')})" if others else ""
        raise common.UsageError(f"no images found in {', '.join(inputs)}{what}")
    return files


def _walk(folder: Path, unlisted: list[Path]) -> list[Path]:
    """The files under ``folder``, sorted; dangling links too (an image name fails, counted; another
    is skipped). Links to folders are followed (``rglob`` passed over them: their images were lost
    unsaid), each folder walked once (a link to a folder above ends there), real folders before
    links. A folder that cannot be read (permission denied ...) is appended to ``unlisted``."""
    found: list[Path] = []
    walked: set[tuple[int, int]] = set()
    for top, dirs, names in os.walk(folder, onerror=lambda e: unlisted.append(Path(e.filename or folder)),
                                    followlinks=True):
        try:
            key = os.stat(top)[1:3]  # (st_ino, st_dev)
        except OSError:  # gone since it was listed
            key = None
            unlisted.append(Path(top))
        if key is None or key in walked:
            dirs.clear()
            continue
        walked.add(key)
        dirs.sort(key=lambda d: (os.path.islink(os.path.join(top, d)), d))  # the walk order picks the name kept
        try:
            found += [f for f in (Path(top) / n for n in names) if f.is_file() or f.is_symlink() and not f.exists()]
        except PermissionError:  # listed but not entered (mode r--): none of its files can be read
            unlisted.append(Path(top))
            dirs.clear()
    return sorted(found)


def _skipped_text(others: Sequence[Path], hint: str = "") -> str:
    """``3 file(s) without an image suffix skipped (.heic, .txt)`` (then ``hint``); ``1 folder(s) that
    could not be read skipped (photos/private)``: the folders in ``others``, from :func:`_walk`."""
    folders = [f for f in others if os.path.isdir(f)]
    suffixes = sorted({f.suffix.lower() or f.name for f in others if f not in folders})
    shown = ", ".join(suffixes[:8]) + (", ..." if len(suffixes) > 8 else "")
    text = f"{len(others) - len(folders)} file(s) without an image suffix skipped ({shown}){hint}" if suffixes else ""
    if folders:
        shown = ", ".join(map(str, folders[:3])) + (", ..." if len(folders) > 3 else "")
        text += f"{'; ' if text else ''}{len(folders)} folder(s) that could not be read skipped ({shown})"
    return text


def _is_predictions_file(path: Path) -> bool:
    """``predictions.json`` or a kept earlier one, ``predictions.<n>.json``."""
    parts = path.name.split(".")
    return parts[0] == "predictions" and parts[-1] == "json" and (
        len(parts) == 2 or len(parts) == 3 and parts[1].isdigit())


def _is_copy(path: Path) -> bool:
    """Whether ``path`` is an annotated copy (its JPEG comment is :data:`MARK`)."""
    from PIL import Image

    try:
        with Image.open(path) as im:  # the header only
            return im.info.get("comment") == MARK
    except Exception:  # not an image PIL reads: not one of ours
        return False
