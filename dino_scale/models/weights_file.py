"""Reading a weights file so that a broken one names itself.

A checkpoint cut short by a copy or download that did not finish fails deep in the reader with a
message that names no file (safetensors: "Error while deserializing header: incomplete
metadata"; torch: "PytorchStreamReader failed reading zip archive", an empty ``EOFError``, a
``KeyError: 101``). These readers raise :class:`WeightsFileError` with the path instead. A file
that ``weights_only`` loading refuses for what it holds keeps torch's own
``pickle.UnpicklingError``: it is readable, and the callers explain that case themselves.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Dict, Union

import torch
from torch import Tensor

__all__ = ["WeightsFileError", "WeightsDownloadError", "check_weights_file", "read_safetensors", "read_torch_file",
           "download_weights"]

PathLike = Union[str, "os.PathLike[str]"]


class WeightsFileError(ValueError):
    """A weights file that exists but cannot be read as the format its name says."""


class WeightsDownloadError(OSError):
    """A weights URL that could not be downloaded (unreachable host, HTTP error, bad address)."""


def download_weights(url: str) -> str:
    """The local copy of ``url`` in torch hub's cache folder (``<hub dir>/checkpoints``),
    downloaded when absent; :class:`WeightsDownloadError` naming the URL when that fails (was
    urllib's ``URLError``, naming no URL). A file of the URL's name already there (put by hand on
    an offline cluster, or by ``torch.hub.load_state_dict_from_url``) is used unless it records
    another URL; a download goes to ``<12 hex of the URL's SHA-256>-<name>`` with its URL beside it
    (``.url``): another URL of the same file name (``.../a/model.pth`` and ``.../b/model.pth``,
    every Hugging Face ``resolve/main/model.safetensors``) gets its own file (it was handed the
    first one's weights). A name with torch hub's hash suffix (``resnet50-0676ba61.pth``: 8 or
    more hex digits, a letter among them, before the extension) is checked against the
    download's SHA-256."""
    import hashlib
    import re
    import urllib.error
    import urllib.parse

    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise WeightsDownloadError(f"{url}: names no file (the address ends in '/'); give the file's URL")
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    plain = os.path.join(folder, name)
    if os.path.exists(plain) and _source_of(plain) in (None, url):
        return plain
    path = os.path.join(folder, f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        stated = re.search(r"-([a-f0-9]{8,64})\.[A-Za-z]+$", name)
        prefix = stated.group(1) if stated and re.search("[a-f]", stated.group(1)) else None
        try:
            torch.hub.download_url_to_file(url, path, hash_prefix=prefix, progress=False)
        except urllib.error.HTTPError as e:
            raise WeightsDownloadError(f"{url}: could not be downloaded (HTTP {e.code} {e.reason})") from None
        except (OSError, ValueError) as e:  # URLError (an OSError): unreachable host; ValueError: bad address
            reason = getattr(e, "reason", None) or e
            raise WeightsDownloadError(f"{url}: could not be downloaded ({type(e).__name__}: {reason}); check "
                                       f"the address and the network, or give a local file") from None
        except RuntimeError as e:  # torch hub: 'invalid hash value' (the partial file is removed)
            raise WeightsDownloadError(f"{url}: the download is not the file its name states ({e})") from None
        with open(path + ".url", "w") as fh:
            fh.write(url)
    return path


def _source_of(path: str) -> str | None:
    """The URL a cached file was downloaded from (None: put there by hand, or by torch hub)."""
    try:
        with open(path + ".url") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _error(path: PathLike, kind: str, exc: BaseException) -> WeightsFileError:
    size = os.path.getsize(path) if os.path.isfile(path) else None
    detail = f"{type(exc).__name__}: {exc}".rstrip(": ")
    return WeightsFileError(f"{path}: not a readable {kind} file ({detail}; {size} bytes): cut short by a "
                            f"copy or download that did not finish, or another format")


def read_safetensors(path: PathLike) -> Dict[str, Tensor]:
    """``safetensors.torch.load_file(path)``; :class:`WeightsFileError` naming ``path`` when the
    file is not a whole safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise _error(path, "safetensors", e) from None


def _check_torch_head(path: PathLike, head: bytes) -> None:
    """torch.save writes a zip archive ("PK"); its legacy format starts with a pickle protocol
    opcode (0x80). Other first bytes (``head``, 2) are no torch file, which weights_only loading
    could take for pickled objects it refuses: :class:`WeightsFileError`."""
    if head[:2] != b"PK" and head[:1] != b"\x80":
        raise _error(path, "torch", EOFError("empty file") if not head else ValueError(f"begins with {head!r}"))


def read_torch_file(path: PathLike, *, weights_only: bool, map_location: Any = "cpu") -> Any:
    """``torch.load(path, map_location, weights_only)``; :class:`WeightsFileError` naming
    ``path`` when the file is not a whole torch file. With ``weights_only``, a file refused for
    the objects it holds raises torch's ``pickle.UnpicklingError`` unchanged."""
    with open(path, "rb") as fh:
        _check_torch_head(path, fh.read(2))
    errors: tuple = (RuntimeError, EOFError, KeyError)
    if not weights_only:  # with weights_only, an UnpicklingError is that refusal
        errors += (pickle.UnpicklingError,)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except errors as e:
        raise _error(path, "torch", e) from None


def check_weights_file(path: PathLike) -> None:
    """:class:`WeightsFileError` naming ``path`` when the file is cut short or not the format its
    name says (``.safetensors``, else a torch file), read from its structure alone: a safetensors
    header and the size its tensors need, or a torch zip archive's directory (kept at the end,
    so a cut-short archive has none). Cheap (no tensor data is read), for a driver to refuse a
    file before the workers that load it start. A torch file of the legacy (pickle) format has
    no such structure and is not checked here; its reader still names it."""
    import json
    import struct
    import zipfile

    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if str(path).endswith(".safetensors"):
            try:
                if len(head) < 8:
                    raise EOFError("no header length")
                (n,) = struct.unpack("<Q", head)
                if 8 + n > size:
                    raise EOFError(f"header of {n} bytes past the end")
                header = json.loads(fh.read(n))
                need = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
            except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
                raise _error(path, "safetensors", e) from None
            if 8 + n + need > size:
                raise _error(path, "safetensors", EOFError(f"its tensors need {8 + n + need} bytes"))
            return
    _check_torch_head(path, head[:2])
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as archive:
                end = max((i.header_offset + i.compress_size for i in archive.infolist()), default=0)
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise _error(path, "torch", e) from None
        if end > size:
            raise _error(path, "torch", EOFError(f"its records need more than {end} bytes"))
