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
