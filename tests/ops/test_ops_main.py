"""`python -m dino_scale.ops build|info`: what a user types, on a machine with or without a GPU."""
from __future__ import annotations

from dino_scale.ops.__main__ import main


def test_build_into_a_folder_it_cannot_create_is_one_line(tmp_path, capsys):
    # was: NotADirectoryError's traceback from the build folder's lock (the Dockerfile's
    # DINO_SCALE_EXT_DIR, or --build-dir, on a read-only or mistyped path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["build", "--arch", "9.0", "--build-dir", str(blocker / "ext")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("build failed: "), err
    assert str(blocker / "ext") in err[0], err


def test_info_says_which_backend_cuda_inputs_take(tmp_path, monkeypatch, capsys):
    import torch

    from dino_scale.ops import __main__ as ops_main

    monkeypatch.setenv("DINO_SCALE_EXT_DIR", str(tmp_path / "ext"))  # an empty cache: not built
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "(not built)" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("default backend"))
    if not torch.cuda.is_available():
        assert "pytorch (no GPU visible)" in line
    # every case of the decision, without a GPU or a build
    assert ops_main._default_backend(False, True, "/usr/local/cuda").startswith("pytorch")
    assert ops_main._default_backend(True, True, None).startswith("cuda (the library")
    assert ops_main._default_backend(True, False, "/usr/local/cuda").startswith("cuda after a JIT build")
    assert ops_main._default_backend(True, False, None).startswith("pytorch, with one warning")


def test_info_says_pytorch_where_the_loader_would_refuse(tmp_path, monkeypatch, capsys):
    """``info`` said "cuda" for a library without code for the visible GPU (the loader refuses
    it: "no kernel image" otherwise) and "cuda after a JIT build" with DINO_SCALE_MSDA_NO_JIT=1
    and nothing built (the loader does not build then). A stand-in GPU of compute capability 9.0
    and a stand-in library built for 8.0."""
    import struct

    import torch

    from dino_scale.ops import _build

    monkeypatch.setenv("DINO_SCALE_EXT_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    monkeypatch.delenv("DINO_SCALE_MSDA_NO_JIT", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_build, "visible_capabilities", lambda: {(9, 0)})
    lib = _build.find_library("8.0")
    lib.parent.mkdir(parents=True, exist_ok=True)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    lib.write_bytes(ident + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 64, 64, 0, 64, 56, 0, 64, 0, 0))
    (lib.parent / _build.ARCH_FILE).write_text("8.0\n")

    def backend_line() -> str:
        assert main(["info"]) == 0
        return next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("default backend"))

    line = backend_line()
    assert "pytorch, with one warning" in line and "has no code for this GPU (compute capability 9.0)" in line, line
    lib.unlink()  # nothing built, JIT off
    monkeypatch.setattr(_build, "visible_capabilities", lambda: {(8, 0)})
    monkeypatch.setenv("DINO_SCALE_MSDA_NO_JIT", "1")
    line = backend_line()
    assert "pytorch, with one warning (not built and DINO_SCALE_MSDA_NO_JIT=1" in line, line
