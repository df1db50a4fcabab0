"""Bookkeeping of the Ray Data datasets built with one ``stats_name``, kept in one small actor on
the driver's node: the epoch clock (which epoch's draws the next pass over a dataset uses,
:func:`set_epoch` / :func:`current_epoch`), the images dropped at decode time with their reasons
(:func:`decode_skips` and the metrics and lines made of them) and the images read as EXIF ties
(:func:`exif_ties`). :mod:`dino_scale.data.ray_data` builds the datasets that report here.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import ray

__all__ = ["set_epoch", "current_epoch", "decode_skips", "skip_metrics", "describe_skips", "skip_reasons",
           "skips_at_end", "exif_ties"]

log = logging.getLogger(__name__)
_STATS_PREFIX = "dino_scale_data_stats:"
_MAX_TIE_IDS = 100_000  # ids kept (each counted once); past that, further ids are not counted
_handles: dict[tuple[str, str, str], Any] = {}


def _session_key(name: str) -> tuple[str, str, str]:
    """Handles are only valid inside the Ray session that made them: a process that calls
    ray.shutdown() and ray.init() again (tests, notebooks) must look the actors up anew."""
    if not ray.is_initialized():
        ray.init()  # what the first .remote() call would do anyway
    ctx = ray.get_runtime_context()  # job ids restart at 01000000 in every new local cluster;
    return (ctx.get_node_id(), ctx.get_job_id(), name)  # node ids are unique per cluster


@ray.remote(num_cpus=0)
class _DataStats:
    """The bookkeeping of the datasets built with one ``stats_name``, in one actor (one process
    on the driver's node, where three actors each took one): the epoch the next pass draws
    (``set_epoch``), the images dropped at decode time and their reasons (:func:`decode_skips`),
    and the ids of EXIF ties (:func:`exif_ties`, each image once)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """A new run's counts (the builders call it on the driver: a second ``fit`` in one process
        found the first one's actor, and reported its skips and ties as its own)."""
        self.epoch = 0
        self.skips, self.skips_by_reason, self.skipped_ids = 0, {}, set()
        self._seen: set[tuple[int, int, str]] = set()
        self.tie_ids: set[int] = set()
        self.ties_capped = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def get_epoch(self) -> int:
        return self.epoch

    def record_skip(self, image_id: Optional[int], reason: str, epoch: Optional[int] = None) -> None:
        """One image dropped in ``epoch``; again for the same (epoch, id, reason) not counted: in
        deterministic runs every worker reads the whole stream, and a resume reads again the
        part of its epoch it skips. (Past 1M such keys, or without an id (None: a negative id is
        an id), every call counts.) The ids are kept once each (the first 10,000)."""
        if epoch is not None and image_id is not None:
            key = (int(epoch), int(image_id), reason)
            if key in self._seen:
                return
            if len(self._seen) < 1_000_000:
                self._seen.add(key)
        self.skips += 1
        self.skips_by_reason[reason] = self.skips_by_reason.get(reason, 0) + 1
        if image_id is not None and len(self.skipped_ids) < 10000:
            self.skipped_ids.add(int(image_id))

    def get_skips(self) -> dict[str, Any]:
        """``count`` (once per epoch an image is skipped in), ``by_reason``, ``image_ids`` (each once)."""
        return {"count": self.skips, "by_reason": dict(self.skips_by_reason), "image_ids": sorted(self.skipped_ids)}

    def add_ties(self, image_ids: list[int]) -> None:
        for i in image_ids:
            if len(self.tie_ids) >= _MAX_TIE_IDS and int(i) not in self.tie_ids:
                self.ties_capped = True
                continue
            self.tie_ids.add(int(i))

    def get_ties(self) -> dict[str, Any]:
        return {"count": len(self.tie_ids), "image_ids": sorted(self.tie_ids)[:10000], "capped": self.ties_capped}


def _stats(stats_name: str):
    """The session's :class:`_DataStats` actor of ``stats_name``, created on first use, pinned to
    the caller's node. The datasets' builders call this on the driver, so the actor lives on the
    driver's node (the head, for a Ray job) and survives the loss of any training node, after
    which a restarted run calls ``set_epoch`` again. Left to the scheduler (or with a soft
    affinity) Ray 2.60 put such actors on other nodes of a 3-node cluster, and a restart after
    that node's loss failed with ``ActorDiedError``. A hard affinity cannot leave it pending: it
    needs no CPU, and the caller's node is alive."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = _STATS_PREFIX + stats_name
    key = _session_key(name)
    if key not in _handles:
        here = NodeAffinitySchedulingStrategy(node_id=key[0], soft=False)
        _handles[key] = _DataStats.options(name=name, get_if_exists=True, scheduling_strategy=here).remote()
    return _handles[key]


def _new_run_stats(stats_name: str) -> None:
    """The :class:`_DataStats` of ``stats_name`` (created here: call from the driver) with a new
    run's counts: a second run in one process found the first one's actor and its counts."""
    ray.get(_stats(stats_name).reset.remote())


def set_epoch(epoch: int, stats_name: str = "train") -> None:
    """Make the next pass over datasets built with ``epoch=None`` use ``epoch``'s draws."""
    ray.get(_stats(stats_name).set_epoch.remote(int(epoch)))


def current_epoch(stats_name: str = "train") -> int:
    return int(ray.get(_stats(stats_name).get_epoch.remote()))


def decode_skips(stats_name: str = "train") -> dict[str, Any]:
    """Images dropped at decode time so far: ``{"count", "by_reason", "image_ids"}``.

    Counts accumulate over every pass over datasets built with this ``stats_name``
    (a row that fails is counted once per epoch it is read in, however many workers or passes read it)."""
    return ray.get(_stats(stats_name).get_skips.remote())


def skip_metrics(stats_name: str = "train", prefix: str = "data_skipped") -> dict[str, int]:
    """:func:`decode_skips` as metrics: ``{prefix: count, prefix/<reason>: count of that reason}``
    (``data_skipped/missing_file``...): which reasons, not only how many."""
    skips = decode_skips(stats_name)
    return {prefix: int(skips["count"]), **{f"{prefix}/{reason}": int(n) for reason, n in
                                            sorted(skips["by_reason"].items())}}


def describe_skips(stats_name: str = "train") -> Optional[str]:
    """One line on the images dropped at decode time (count by reason, the first ids), or None."""
    skips = decode_skips(stats_name)
    if not skips["count"]:
        return None
    ids = skips["image_ids"]  # each once: an image skipped in 12 epochs was listed 12 times, the others not at all
    count = (f"{skips['count']} image(s) skipped" if skips["count"] == len(ids) else
             f"{skips['count']} skips (once per epoch each) of {len(ids)} image(s)")
    return (f"{count} at decode time ("
            + ", ".join(f"{reason} {n}" for reason, n in sorted(skips["by_reason"].items()))
            + f"); image ids {ids[:10]}{' ...' if len(ids) > 10 else ''}. The data workers log each with its "
              f"reason; `dino-scale check-data <folder>` lists damaged records")


def skip_reasons(stats_name: str = "eval") -> list[str]:
    """The reasons images of ``stats_name`` were dropped for, sorted; [] when the counts cannot be
    read (a warning that names them must not fail an evaluation)."""
    try:
        return sorted(decode_skips(stats_name)["by_reason"])
    except Exception:  # noqa: BLE001
        return []


def skips_at_end(stats_name: str = "train") -> dict[str, int]:
    """:func:`skip_metrics` for a run's final metrics, logged with the first image ids
    (:func:`describe_skips`); empty when the counts cannot be read (they do not fail a run)."""
    try:
        metrics = skip_metrics(stats_name)
        if metrics["data_skipped"]:
            log.warning("%s data: %s", stats_name, describe_skips(stats_name))
        return metrics
    except Exception as exc:  # noqa: BLE001 - a count is not worth a failed run
        log.warning("%s data: the decode-time skip counts could not be read (%s)", stats_name, type(exc).__name__)
        return {}


def exif_ties(stats_name: str = "train") -> dict[str, Any]:
    """Images whose EXIF orientation tag keeps their size, read with ``data.exif_orientation=auto``
    (a tie the annotated size cannot decide; turned upright): ``{"count", "image_ids", "capped"}``,
    each image once whatever the passes (``capped``: more than 100,000, the rest not counted). A
    count above 0 says to choose ``stored`` (COCO/Objects365) or ``upright`` (labelling tools)."""
    return ray.get(_stats(stats_name).get_ties.remote())
