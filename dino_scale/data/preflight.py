"""Before a run: every shard of a dataset is there, whole, and a Parquet file of the record columns.

:func:`~.manifest.check_shards` compares each shard's size with its manifest (one ``stat``), which
finds a missing shard and one cut short, but not damage that keeps the size (an overwritten
footer, a column renamed or retyped in it), nor a truncated shard of a manifest that records no
sizes. Such a shard passed the checks made before a run and then failed it where Ray Data opened
the file: when the dataset was planned (after Ray and the MLflow run had started, with pyarrow's
error and not the file's name), or inside an epoch; a column renamed in the footer instead
dropped every record of that shard each epoch (counted ``damaged``).

:func:`preflight_shards` reads, besides the ``stat``, each shard's Parquet footer (its metadata:
a few KB at the end of the file, never row data), checks its schema against
:data:`~.records.SCHEMA` and its row count against the manifest, and raises one
:class:`~.manifest.ShardError` naming every damaged shard and what is wrong with it. The policy is
that of :func:`~.manifest.check_shards`: a damaged shard is refused, not skipped, since skipping
one drops its images from every epoch of the run unseen (a record is skipped and counted, a
shard is not). The footers are read :data:`THREADS` at a time (on a bucket mount each read is a
request or two); a footer read once in this process is not read again while the file keeps its
size and modification time, so the engine's check and the Ray datasets it then builds cost one
read per shard. Damage inside the row data (a page, a compressed column) is found where it is
read, or up front by ``dino-scale check-data``, which reads every record.

:func:`check_image_roots`: a folder converted without ``--embed-images`` names its images by a
root recorded at conversion (the converting machine's path). Where that root does not exist, or
holds none of the first images, every record was a counted ``missing_file`` skip: a run on a
cluster trained on nothing. Refused before the run, naming the fix. :func:`check_image_files`
(``check-data``) looks for every record's image file.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import pyarrow as pa
import pyarrow.parquet as pq

from .manifest import MANIFEST_NAME, PathLike, ShardError, _agreeing_manifests
from .records import schema_problems
from .shard_read import open_shard, read_columns, shard_batches

__all__ = ["check_image_files", "check_image_roots", "preflight_shards", "shard_problem", "THREADS"]

log = logging.getLogger(__name__)

THREADS = 32  # shards inspected at a time
_READ_ERRORS = (OSError, pa.ArrowException, ValueError)  # a footer Parquet cannot parse
_checked: dict[str, tuple[int, int, Any, Any]] = {}  # path -> (size, mtime ns, manifest bytes, rows) found sound
_checked_lock = threading.Lock()


def shard_problem(path: Path, entry: dict[str, Any]) -> Optional[str]:
    """What is wrong with the shard at ``path`` given its manifest ``entry`` (``file``, and
    ``bytes`` / ``num_images`` where recorded), as words that follow its name, or ``None``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "is missing"
    except OSError as e:
        return f"cannot be opened ({type(e).__name__}: {e})"
    want_bytes, want_rows = entry.get("bytes"), entry.get("num_images")
    if want_bytes is not None and st.st_size != int(want_bytes):
        return f"has {st.st_size} bytes, the manifest {int(want_bytes)}"
    key = (st.st_size, st.st_mtime_ns, want_bytes, want_rows)
    with _checked_lock:
        if _checked.get(str(path)) == key:
            return None
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except _READ_ERRORS as e:
        return f"has a footer Parquet cannot read ({type(e).__name__}: {str(e).strip()[:200]})"
    wrong = schema_problems(schema)
    if wrong:
        return f"does not hold the record columns ({'; '.join(wrong)})"
    if want_rows is not None and meta.num_rows != int(want_rows):
        return f"holds {meta.num_rows} records, the manifest {int(want_rows)}"
    with _checked_lock:
        _checked[str(path)] = key
    return None


def _describe(problems: list[tuple[str, str]], total: int) -> str:
    """``(file, problem)`` pairs -> one line naming every file, those with the same problem together."""
    groups: dict[str, list[str]] = {}
    for name, problem in problems:
        groups.setdefault(problem, []).append(name)
    parts = [f"{names[0]} {problem}" if len(names) == 1 else f"{', '.join(names)} (each) {problem}"
             for problem, names in groups.items()]
    return (f"{len(problems)} of {total} shards are damaged (checked against {MANIFEST_NAME} and their "
            f"Parquet footers before the run): {'; '.join(parts)}")


def preflight_shards(data_dir: Union[PathLike, Sequence[PathLike]], threads: int = THREADS) -> list[Path]:
    """All shard files of one or several dataset folders (as :func:`~.manifest.shard_paths`), once
    each is there at its recorded size with a readable footer, the record columns and the
    manifest's row count; else one :class:`~.manifest.ShardError` naming every damaged shard of
    the first folder that has one and, in its text, those of the other folders."""
    t0 = time.perf_counter()
    folders = _agreeing_manifests(data_dir)
    jobs = [(folder, folder / s["file"], s) for folder, manifest in folders for s in manifest["shards"]]
    with ThreadPoolExecutor(max(1, min(int(threads), len(jobs) or 1))) as pool:
        found = list(pool.map(lambda job: shard_problem(job[1], job[2]), jobs))
    bad: dict[Path, list[tuple[str, str]]] = {}
    for (folder, _, entry), problem in zip(jobs, found):
        if problem is not None:
            bad.setdefault(folder, []).append((entry["file"], problem))
    log.info("preflight: %d shards of %d folder(s) checked in %.2f s", len(jobs), len(folders),
             time.perf_counter() - t0)
    if bad:
        counts = {folder: len(manifest["shards"]) for folder, manifest in folders}
        first, *others = bad
        detail = _describe(bad[first], counts[first]) + "".join(
            f"; and in {other}: {_describe(bad[other], counts[other])}" for other in others)
        raise ShardError(first, detail)
    return [path for _, path, _ in jobs]


def _first_file_names(folder: Path, count: int) -> list[str]:
    """The ``file_name`` of the first ``count`` records of ``folder``'s first non-empty shard."""
    from .manifest import shard_paths
    from .records import _name

    for path in shard_paths(folder):
        for batch in shard_batches(open_shard(path), ["file_name"], count):
            names = [_name(n) for n in batch.column(0).to_pylist() if n is not None]
            if names:
                return names
    return []


def check_image_roots(data_dir: Union[PathLike, Sequence[PathLike]], image_root: Optional[Any] = None,
                      samples: int = 8, key: str = "data.image_root") -> None:
    """:class:`~dino_scale.config.ConfigError` (also for roots that do not fit the folders: too
    many, or one for folders converted against different roots) unless each dataset folder that
    references image files (converted without ``--embed-images``) has its image root (recorded, or ``image_root``:
    the ``data.image_root`` override, see :func:`~.image_paths.folder_image_roots`) as a folder on this
    machine holding at least one of its first ``samples`` images. The workers resolve the same
    paths: a driver that does not see the images is a node that would not either (the cluster
    YAMLs mount the data on every node). Files missing past that are counted skips, not refused."""
    from dino_scale.config import ConfigError

    from .image_paths import folder_image_roots
    from .manifest import read_manifest

    fix = (f"pass --set {key}=<the images' folder on the nodes> (one per dataset folder, "
           "comma-separated, in order), or convert with --embed-images to keep the images in the shards")
    try:
        roots = folder_image_roots(data_dir, image_root)
    except ValueError as exc:  # roots that do not fit the folders: the user's setting, named as such
        raise ConfigError(f"{key}: {exc}") from exc
    for folder, root in roots:
        if read_manifest(folder).get("embed_images") or root is None:
            continue
        if not Path(root).is_dir():
            raise ConfigError(f"the images of {folder} are read from {root} (recorded at conversion"
                              f"{'' if not image_root else ', or ' + key}), which is not a folder "
                              f"on this machine: every image would be skipped as missing. {fix}")
        names = _first_file_names(folder, samples)
        if names and not any(_found(root, n) for n in names):
            raise ConfigError(f"none of the first {len(names)} images of {folder} is under {root} (e.g. "
                              f"{names[0]!r}): every image would be skipped as missing. {fix}")


def _found(root, name: str) -> bool:
    """Whether ``name`` is a file under ``root`` (a name the lookup refuses, e.g. one outside the
    root or too long for the OS, is not: each such image is an ``unreadable`` skip)."""
    from .image_paths import resolve_image_path

    try:
        return resolve_image_path(root, name) is not None
    except OSError:
        return False


MISSING_LISTED = 20  # image files a check_image_files report names


def check_image_files(data_dir, image_root: Optional[Any] = None, workers: int = 8,
                      on_progress: Optional[Callable[[int, int], None]] = None) -> dict[str, Any]:
    """Whether the image file of every record of ``data_dir`` (one folder, several, or ``"a,b"``)
    is there: folders converted with ``--embed-images`` hold their images and are not looked
    at; the others name files under their recorded root (or ``image_root``, as
    :func:`check_image_roots` takes it). Returns ``{"checked": records looked up, "missing":
    count, "examples": the first missing ones as "<root>/<file name>", "embedded": folders
    holding their images, "no_root": folders recorded without an image root (not looked up, as
    :func:`check_image_roots` does not)}``. ``workers`` lookups at a time (threads: each is a ``stat``, a
    request on a network mount); ``on_progress(done, total)`` per folder, every 10k records."""
    from .image_paths import folder_image_roots
    from .manifest import read_manifest, shard_paths
    from .records import _name

    out: dict[str, Any] = {"checked": 0, "missing": 0, "examples": [], "embedded": [], "no_root": []}
    for folder, root in folder_image_roots(data_dir, image_root):
        manifest = read_manifest(folder)
        if manifest.get("embed_images"):
            out["embedded"].append(str(folder))
            continue
        if not root:  # converted by the library without an image root: names relative to each reader
            out["no_root"].append(str(folder))
            continue
        total = int(manifest.get("num_images") or 0)
        done = 0
        with ThreadPoolExecutor(max(1, int(workers))) as pool:
            for path in shard_paths(folder):  # a shard's names at a time, looked up 10k at a time
                names = [_name(n) for n in read_columns(path, ["file_name"]).column(0).to_pylist()]
                for start in range(0, len(names), 10000):
                    chunk = names[start:start + 10000]
                    for name, found in zip(chunk, pool.map(lambda n: bool(n) and _found(root, n), chunk)):
                        if not found:
                            out["missing"] += 1
                            if len(out["examples"]) < MISSING_LISTED:
                                out["examples"].append(str(Path(root or ".") / str(name or "")))
                    done += len(chunk)
                    if on_progress is not None:
                        on_progress(done, max(total, done))
        out["checked"] += done
    return out
