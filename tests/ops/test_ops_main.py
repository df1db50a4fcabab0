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
