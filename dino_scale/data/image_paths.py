"""Where a record's image file is: an image root per dataset folder (recorded at conversion, or
overridden), and a file name looked up under it.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Optional, Sequence, Union

from .manifest import PathLike, data_dirs, read_manifest

__all__ = ["OUTSIDE_ROOT", "resolve_image_path", "Roots", "folder_image_roots", "val_image_roots"]

OUTSIDE_ROOT = "lies outside the image root"


def resolve_image_path(root: Optional[PathLike], file_name: str) -> Optional[Path]:
    """Find ``file_name`` under ``root``; ``None`` when absent.

    Objects365 annotation files name images ``images/v1/patchN/x.jpg`` (v2 also
    ``images/v2/patchN``) while the archives unpack to ``<root>/patchN/x.jpg``; the
    prefixes ``images/v1/``, ``images/v2/`` and ``images/`` are tried stripped. No other
    fallback: a file of the same base name in another folder is another image.
    Raises ``OSError`` where the OS refuses the lookup (a name too long, no permission on a
    folder, I/O errors): callers count that as an unreadable image. So is a name that leaves
    ``root`` (an absolute path elsewhere, or climbing out with ``..``): an annotation file copied any file its
    reader could read into the shards (``--embed-images``), or trained on it. Symbolic links
    inside ``root`` are followed (the check is on the name).
    """
    base = Path(root) if root is not None else Path(".")
    candidates = [file_name]
    for prefix in ("images/v1/", "images/v2/", "images/"):
        if file_name.startswith(prefix):
            candidates.append(file_name[len(prefix):])
    if root is not None:  # by name: an absolute name inside the root is fine, as is a/../b;
        top = os.path.abspath(root)  # each stripped name too ("images/v1/../../x" is "../../x")
        for cand in candidates:
            if os.path.commonpath([top, os.path.normpath(os.path.join(top, cand))]) != top:
                raise PermissionError(errno.EACCES, f"{file_name} {OUTSIDE_ROOT} {root}")
    for cand in candidates:
        p = base / cand
        if p.is_file():
            return p
    return None


# an image-root override: none, one root for every folder, or one per folder (list or "a,b")
Roots = Union[None, str, Sequence[Optional[str]]]


def folder_image_roots(data_dir: Union[PathLike, Sequence[PathLike]],
                       image_root: Roots = None) -> list[tuple[Path, Optional[str]]]:
    """``(folder, image root)`` for each dataset folder of ``data_dir`` (see :func:`~.manifest.data_dirs`).

    Without ``image_root``, each folder's root is the one recorded in its own manifest at
    conversion (``None`` for embedded images). ``image_root`` overrides it: one path applies
    to every folder, which is refused (``ValueError``) when the folders that reference files
    were converted against different roots, as one path cannot hold both folders' images;
    give one root per folder instead, as a list or ``"root_a,root_b"`` in folder order.
    """
    dirs = data_dirs(data_dir)
    manifests = [read_manifest(d) for d in dirs]
    if not image_root:
        return [(d, m.get("image_root")) for d, m in zip(dirs, manifests)]
    roots = ([str(r) if r else "" for r in image_root] if not isinstance(image_root, (str, Path))
             else [r.strip() for r in str(image_root).split(",")])
    if len(roots) > 1:
        if len(roots) != len(dirs):
            raise ValueError(f"image_root names {len(roots)} roots for {len(dirs)} dataset folders "
                             f"({', '.join(map(str, dirs))}): give one root, or one per folder in folder order")
        return [(d, r or m.get("image_root")) for d, r, m in zip(dirs, roots, manifests)]
    recorded = {m.get("image_root") for m in manifests if not m.get("embed_images")}
    if len(recorded) > 1:
        raise ValueError(
            f"image_root={roots[0]!r} is ambiguous: the dataset folders {', '.join(map(str, dirs))} were "
            f"converted against different image roots {sorted(map(str, recorded))}; give one root per "
            f"folder in folder order (image_root='root_a,root_b'), or none to use the recorded ones")
    return [(d, roots[0]) for d in dirs]


def val_image_roots(data_cfg) -> Optional[str]:
    """The image-root override of the validation folders: ``data.val_image_root``, else
    ``data.image_root`` (one setting served both, so moved train and val folders could not both
    be found)."""
    return getattr(data_cfg, "val_image_root", None) or data_cfg.image_root
