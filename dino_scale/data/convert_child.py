"""The image pass of a conversion in a child process (annotation files of 64 MB and more: the
parent reads the annotations meanwhile), ended by the kernel when its parent dies."""
from __future__ import annotations

import os
import signal

from .convert_passes import scan_images

__all__ = ["die_with_parent", "images_child"]


def die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel ends this process when its parent does (``PR_SET_PDEATHSIG``). The image
    pass child of a parent killed with SIGKILL went on appending to the work folder that the
    rerun's own scan then used: the rerun failed ("manifest counts do not add up"), and so did
    every run after it. Elsewhere (no ``prctl``) nothing changes."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent was gone before the call
        os._exit(1)


def images_child(conn, args, parent_pid: int) -> None:
    """The image pass (:func:`~.convert_passes.scan_images` of ``args``) in a spawned child, its
    result or error sent through ``conn``; it ends with its parent (``parent_pid``)."""
    die_with_parent(parent_pid)
    try:
        conn.send(("ok", scan_images(*args)))
    except BaseException as e:  # noqa: BLE001 - forwarded to the parent
        conn.send(("err", e))
    finally:
        conn.close()
