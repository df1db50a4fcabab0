"""Stand-ins for the csrc/ build's toolchain and libraries (tests/ops): a complete ELF-headed
library without code, a ``cpp_extension.load`` that writes one, ``_compile`` without nvcc, and a
truncated real shared object."""
from __future__ import annotations

from pathlib import Path

from dino_scale.ops import _build


def elf(payload: bytes) -> bytes:
    """A stand-in library that passes _build.library_complete: a 64-bit ELF header with no
    segments and an empty section header table, then ``payload``."""
    import struct

    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 64, 64, 0, 64, 56, 0, 64, 0, 0)
    return header + payload


def library_builder(log=None, payload=b"library"):
    """A stand-in for torch's ``load``: writes a complete (ELF-headed) library named ``name``.so
    into ``build_directory`` and appends that folder to ``log``."""
    def build(name, sources, build_directory, **kw):
        if log is not None:
            log.append(build_directory)
        out = Path(build_directory, f"{name}.so")
        out.write_bytes(elf(payload))
        return str(out)
    return build


def fake_toolchain(monkeypatch, tmp_path, load):
    """``_compile`` with a stand-in for ``cpp_extension.load`` (no nvcc run)."""
    import torch
    import torch.utils.cpp_extension as cpp_ext

    monkeypatch.setattr(_build, "find_cuda_home", lambda: str(tmp_path / "cuda"))
    monkeypatch.setattr(_build, "extra_system_includes", lambda cuda_home: [])
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setattr(cpp_ext, "CUDA_HOME", cpp_ext.CUDA_HOME)  # _compile pins it; restore after
    monkeypatch.setattr(cpp_ext, "load", load)


def truncated_shared_object(dest: Path) -> Path:
    """The first 4 KiB of a real shared object (CPython's _ctypes): what a crash before the
    renamed library reached the disk, or an interrupted copy of a cache folder, leaves behind.
    The dynamic loader maps its segments past the end of the file: SIGBUS, no exception."""
    import _ctypes

    dest.write_bytes(Path(_ctypes.__file__).read_bytes()[:4096])
    return dest

