"""`pipelines.predict`: which files it reads as images (folders, patterns, links, unreadable
folders, an image named twice) and the names of its annotated copies; no model is run."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from PIL import Image

from pipelines.predict import list_images, name_key, output_path


def test_output_names_skip_inputs_and_earlier_copies(tmp_path):
    out = tmp_path / "photos"
    inputs = [out / "a.jpg", out / "sub" / "a.jpg", out / "a-2.jpg"]
    taken = {name_key(p) for p in inputs}
    names = [output_path(out, p, i, taken) for i, p in enumerate(inputs, 1)]
    assert len(set(names)) == 3 and not {n.resolve() for n in names} & {p.resolve() for p in inputs}
    assert names == [out / "a-1.jpg", out / "a-2-1.jpg", out / "a-2-3.jpg"]


def test_out_inside_an_input_folder_is_not_read_back(tmp_path):
    photos = tmp_path / "photos"
    (photos / "annotated").mkdir(parents=True)
    for p in (photos / "a.jpg", photos / "annotated" / "a.jpg"):
        Image.new("RGB", (8, 8)).save(p)
    assert list_images([str(photos)], skip_dir=photos / "annotated") == [photos / "a.jpg"]
    # the output folder given as the input is read whole
    assert list_images([str(photos / "annotated")], skip_dir=photos / "annotated") == [photos / "annotated" / "a.jpg"]


def test_out_above_an_input_folder_drops_none_of_its_images(tmp_path, monkeypatch):
    """``predict photos/ --out .`` (or ``--out ..``, ``~``): every file under the output folder was
    left out unless the input folder was the output folder itself, so an input folder inside
    ``--out`` lost all its images, unsaid ("no images found", or a run over the other inputs).
    Only what predict writes into ``--out`` itself is left out now."""
    from pipelines.predict import MARK

    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for p in (photos / "a.jpg", photos / "sub" / "b.png"):
        Image.new("RGB", (8, 8)).save(p)
    (photos / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg", comment=MARK)  # an annotated copy of an earlier run
    (tmp_path / "predictions.json").write_text("{}")
    (tmp_path / "predictions.2.json").write_text("{}")
    Image.new("RGB", (8, 8)).save(tmp_path / "mine.jpg")  # the user's photo beside them
    monkeypatch.chdir(tmp_path)
    for out in (Path("."), tmp_path):
        skipped: list = []
        assert list_images(["photos"], skip_dir=out, skipped=skipped) == [Path("photos/a.jpg"),
                                                                          Path("photos/sub/b.png")]
        assert skipped == [Path("photos/notes.txt")]
        skipped = []
        assert list_images(["."], skip_dir=out, skipped=skipped) == [Path("mine.jpg"), Path("photos/a.jpg"),
                                                                     Path("photos/sub/b.png")]
        assert skipped == [Path("photos/notes.txt")]


def test_a_folder_named_like_an_image_is_searched_not_read(tmp_path):
    """A folder named ``album.jpg`` was listed as an image and reported as an unreadable image
    (``[Errno 21] Is a directory``); the images inside it are listed, the folder is not."""
    (tmp_path / "album.jpg").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "album.jpg" / "b.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    assert list_images([str(tmp_path)]) == [tmp_path / "a.jpg", tmp_path / "album.jpg" / "b.png"]


def test_an_image_named_twice_is_predicted_once(tmp_path):
    """``predict photos/ photos/best.jpg`` (or overlapping folders) predicted best.jpg twice: two
    annotated copies (best.jpg, best-2.jpg) and two entries in predictions.json. Each image is
    listed once, where it first appears."""
    (tmp_path / "sub").mkdir()
    for name in ("a.jpg", "sub/b.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    got = list_images([str(tmp_path / "sub" / "b.jpg"), str(tmp_path), str(tmp_path / "sub"),
                       str(tmp_path / "sub" / ".." / "a.jpg")])
    assert got == [tmp_path / "sub" / "b.jpg", tmp_path / "a.jpg"]


def test_a_quoted_pattern_is_expanded_and_macos_metadata_files_are_not_images(tmp_path):
    """``predict 'photos/*.jpg'`` (quoted: the shell left the pattern) was "image path not found";
    a folder copied from a Mac holds ``._name.jpg`` metadata files, which were read as images and
    listed as failed."""
    from pipelines._common import UsageError

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.jpg", "b.jpg", "c.png"):
        Image.new("RGB", (8, 8)).save(photos / name)
    (photos / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert [p.name for p in list_images([str(photos / "*.jpg")])] == ["a.jpg", "b.jpg"]
    skipped: list = []
    assert [p.name for p in list_images([str(photos)], skipped=skipped)] == ["a.jpg", "b.jpg", "c.png"]
    assert [p.name for p in skipped] == ["._a.jpg"]
    with pytest.raises(UsageError, match="no file matches the image pattern"):
        list_images([str(photos / "*.gif")])


def test_a_dangling_link_in_a_folder_is_listed_not_lost(tmp_path):
    """A symbolic link whose target is gone was neither predicted nor listed as skipped (the walk
    kept regular files only): an image name is now listed (its read fails, counted under
    "failed"), another name is skipped and counted."""
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "a.jpg")
    (photos / "gone.jpg").symlink_to(tmp_path / "moved-away.jpg")
    (photos / "gone.txt").symlink_to(tmp_path / "moved-away.txt")
    skipped: list = []
    assert list_images([str(photos)], skipped=skipped) == [photos / "a.jpg", photos / "gone.jpg"]
    assert skipped == [photos / "gone.txt"]


def test_images_in_a_linked_folder_are_listed(tmp_path):
    """``rglob`` passed over a symbolic link to a folder (and the link is no file): every image in
    it was neither predicted nor listed as skipped or failed. Links to folders are followed."""
    photos, shared = tmp_path / "photos", tmp_path / "shared"
    (shared / "deeper").mkdir(parents=True)
    photos.mkdir()
    for p in (photos / "a.jpg", shared / "b.png", shared / "deeper" / "c.jpg"):
        Image.new("RGB", (8, 8)).save(p)
    (shared / "notes.txt").write_text("not an image")
    (photos / "linked").symlink_to(shared, target_is_directory=True)
    skipped: list = []
    assert list_images([str(photos)], skipped=skipped) == [photos / "a.jpg", photos / "linked" / "b.png",
                                                           photos / "linked" / "deeper" / "c.jpg"]
    assert skipped == [photos / "linked" / "notes.txt"]


def test_a_link_cycle_ends_and_lists_each_image_once(tmp_path):
    """Followed links to folders may lead back up (``photos/ext -> shared``, ``shared/back -> photos``,
    ``photos/sub/up -> photos``): each folder is walked once, each image listed once, under its name
    outside the links where it has one (``sub/b.jpg``, not ``alias/b.jpg``)."""
    photos, shared = tmp_path / "photos", tmp_path / "shared"
    (photos / "sub").mkdir(parents=True)
    shared.mkdir()
    for p in (photos / "a.jpg", photos / "sub" / "b.jpg", shared / "c.jpg"):
        Image.new("RGB", (8, 8)).save(p)
    (photos / "ext").symlink_to(shared, target_is_directory=True)
    (shared / "back").symlink_to(photos, target_is_directory=True)
    (photos / "sub" / "up").symlink_to(photos, target_is_directory=True)
    (photos / "alias").symlink_to(photos / "sub", target_is_directory=True)  # sorts before sub
    want = [photos / "a.jpg", photos / "ext" / "c.jpg", photos / "sub" / "b.jpg"]
    assert list_images([str(photos)]) == want
    from pipelines.predict_inputs import _walk

    unlisted: list = []
    assert _walk(photos, unlisted) == want and unlisted == []  # the walk itself, before list_images drops repeats


def test_a_folder_that_cannot_be_read_is_reported_as_skipped(tmp_path, monkeypatch):
    """A folder whose listing fails (permission denied) was dropped unsaid, with its images; it is
    listed under ``skipped`` and named in the summary. Where mode 000 does not stop this user
    (root), the listing fails as it does for another user."""
    from pipelines._common import UsageError
    from pipelines.predict_inputs import _skipped_text

    photos = tmp_path / "photos"
    private = photos / "private"
    private.mkdir(parents=True)
    for p in (photos / "a.jpg", private / "b.jpg"):
        Image.new("RGB", (8, 8)).save(p)
    (photos / "notes.txt").write_text("not an image")
    private.chmod(0)
    try:
        if os.access(private, os.R_OK):
            real_scandir = os.scandir

            def scandir(path="."):
                if os.path.abspath(path) == str(private):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
                return real_scandir(path)

            monkeypatch.setattr(os, "scandir", scandir)
        skipped: list = []
        assert list_images([str(photos)], skipped=skipped) == [photos / "a.jpg"]
        assert skipped == [private, photos / "notes.txt"]
        assert _skipped_text(skipped) == ("1 file(s) without an image suffix skipped (.txt); "
                                          f"1 folder(s) that could not be read skipped ({private})")
        with pytest.raises(UsageError, match=r"no images found in .*private \(1 folder\(s\) that could not be "
                                             r"read skipped \(.*private\)\)$"):
            list_images([str(private)])
    finally:
        private.chmod(0o755)


def test_a_folder_that_can_be_listed_but_not_entered_is_skipped_not_fatal(tmp_path, monkeypatch):
    """A folder of mode r-- lists its names but refuses a stat of its files: checking them raised
    PermissionError and predict stopped on the first such folder. It is skipped and named, as a
    folder that cannot be listed is. (Root passes any mode: the refused stat is made here.)"""
    photos = tmp_path / "photos"
    locked = photos / "locked"
    locked.mkdir(parents=True)
    for p in (photos / "a.jpg", locked / "b.jpg"):
        Image.new("RGB", (8, 8)).save(p)
    real_is_file = Path.is_file

    def is_file(self):
        if self.parent == locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    skipped: list = []
    assert list_images([str(photos)], skipped=skipped) == [photos / "a.jpg"]
    assert skipped == [locked]

