"""Bad input, the annotation file: malformed JSON, another format, another encoding; each is an
error that names the file and the byte, and no output folder is left behind."""
from __future__ import annotations

import json

import pytest

from dino_scale.data import MalformedJSONError, convert_coco
from test_data_bad_input import _jpeg


@pytest.mark.parametrize("text,needle", [
    ('{"images": [{"id": 1,, "file_name": "a.jpg"}], "annotations": [], "categories": []}', ",,"),
    ('{"images": [], "annotations": [{"bbox": [1, NaN, 2, 3]}], "categories": []}', "NaN"),
])
def test_data_malformed_json_names_byte_position(tmp_path, text, needle):
    ann = tmp_path / "bad.json"
    ann.write_text(text)
    with pytest.raises(MalformedJSONError) as ei:
        convert_coco(ann, None, tmp_path / "out", progress=False)
    expected = text.index(needle) + (1 if needle == ",," else 0)
    assert ei.value.position == expected, str(ei.value)
    assert f"at byte {expected}" in str(ei.value) and "bad.json" in str(ei.value)
    if needle == "NaN":
        assert "write null" in str(ei.value)
    assert not (tmp_path / "out").exists()  # the folder it made (was left with .lock and .convert-work/)
    with pytest.raises(MalformedJSONError):  # an Objects365 split: out/val refused, and out itself gone
        convert_coco(ann, None, tmp_path / "split", o365_val_split=1, progress=False)
    assert not (tmp_path / "split").exists()
    kept = tmp_path / "kept"  # a folder that was there is kept, with what the user had in it
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(MalformedJSONError):
        convert_coco(ann, None, kept, progress=False)
    assert (kept / "notes.txt").read_text() == "mine"


def test_data_a_file_that_is_not_json_says_what_it_is(tmp_path):
    # an image given as the annotation file: the message held the parser's bytes repr
    # (b'lexical error: ...\\n ... \\xff ...') and a hint about NaN literals and byte-order marks
    jpeg = tmp_path / "0.jpg"
    jpeg.write_bytes(_jpeg())
    with pytest.raises(MalformedJSONError) as ei:
        convert_coco(jpeg, None, tmp_path / "out", progress=False)
    message = str(ei.value)
    assert message.endswith("at byte 0 (line 1, column 1): lexical error: invalid char in json text. (not a JSON "
                            "file: it is a JPEG image; the annotation file is COCO-format JSON)"), message
    text = tmp_path / "notes.json"
    text.write_text("hello")
    with pytest.raises(MalformedJSONError, match=r"not a JSON file: it starts with b'hello'"):
        convert_coco(text, None, tmp_path / "out", progress=False)
    utf16 = tmp_path / "utf16.json"  # Windows tools save "Unicode" so
    utf16.write_text('{"images": []}', encoding="utf-16")
    with pytest.raises(MalformedJSONError, match=r"not a JSON file: it is UTF-16 text \(JSON is UTF-8: re-save"):
        convert_coco(utf16, None, tmp_path / "out", progress=False)


def test_data_json_not_in_utf8_says_so(tmp_path):
    """A Latin-1 file (a category name with an accent) failed as "lexical error: invalid bytes in
    UTF8 string" only: the message now says the file must be re-saved as UTF-8, and where."""
    ann = tmp_path / "latin1.json"
    text = '{"images": [], "annotations": [], "categories": [{"id": 1, "name": "caf\u00e9"}]}'
    ann.write_bytes(text.encode("latin-1"))
    with pytest.raises(MalformedJSONError, match="re-save it as UTF-8") as ei:
        convert_coco(ann, None, tmp_path / "out", progress=False)
    assert text.index("\u00e9") <= ei.value.position <= text.index("\u00e9") + 1  # the parser stops at or after it


def test_data_json_with_a_lone_surrogate_escape_is_located(tmp_path):
    """``"caf\\udce9.jpg"``: how Python's ``json.dump`` writes a file name that is not UTF-8 (from
    ``os.listdir``), which Python reads back but ijson's parser refuses with a bare
    ``UnicodeDecodeError``: the conversion stopped with "'utf-8' codec can't decode byte ..." (no
    file, no place) and left its new output folder (``.lock``, ``.convert-work/``) behind."""
    doc = {"info": {"description": "x"}, "categories": [{"id": 1, "name": "\U0001F600 a pair is fine"}],
           "images": [{"id": 1, "file_name": "caf\udce9.jpg", "width": 4, "height": 4}], "annotations": []}
    ann = tmp_path / "names.json"
    ann.write_text(json.dumps(doc, indent=1))
    text = ann.read_text()
    with pytest.raises(MalformedJSONError, match=r"\(line 14, column 21\): a \\u escape of a lone surrogate") as ei:
        convert_coco(ann, tmp_path, tmp_path / "out", progress=False)
    assert ei.value.position == text.index("\\udce9") and "rename that file to UTF-8" in str(ei.value)
    assert not (tmp_path / "out").exists()  # the folder it made is removed


def test_data_truncated_json_reports_end_of_file(tmp_path):
    text = json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}] * 3,
                       "categories": [{"id": 1, "name": "a"}]})
    ann = tmp_path / "cut.json"
    ann.write_text(text[:-20])
    with pytest.raises(MalformedJSONError, match=f"at byte {len(text) - 20} "):
        convert_coco(ann, None, tmp_path / "out", progress=False)


def test_data_float_overflow_in_json_is_located(tmp_path):
    text = '{"images": [], "annotations": [{"bbox": [1, 1e400, 2, 3]}], "categories": []}'
    ann = tmp_path / "big.json"
    ann.write_text(text)
    with pytest.raises(MalformedJSONError) as ei:
        convert_coco(ann, None, tmp_path / "out", progress=False)
    assert ei.value.position > 0 and "beyond float range" in str(ei.value)

