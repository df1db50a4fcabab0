"""Streaming reads of COCO-format annotation JSON with ijson (bounded memory).

``stream_items(path, "annotations.item")`` yields one dict at a time whatever the file
size. A syntax error becomes :class:`MalformedJSONError` naming the byte offset (and
line/column) of the offending character, found by re-feeding the failing region one
byte at a time to a fresh parser.
"""
from __future__ import annotations

import mmap
import re
from pathlib import Path
from typing import Any, Iterator, Union

import ijson

__all__ = ["MalformedJSONError", "stream_items", "locate_json_error"]

_BUF = 1 << 20


class MalformedJSONError(ValueError):
    """The annotation file is not valid JSON; ``position`` is the 0-based byte offset."""

    def __init__(self, path: Union[str, Path], position: int, line: int, column: int, detail: str):
        self.path, self.position, self.line, self.column = str(path), position, line, column
        detail = _parser_words(detail)
        hint = ""
        other = _not_json(path) if position == 0 else None
        if other:
            hint = f" (not a JSON file: {other}; the annotation file is COCO-format JSON)"
        elif "invalid bytes in utf8" in detail.lower():
            hint = (" (JSON is UTF-8 and this file is not: re-save it as UTF-8, e.g. "
                    "`iconv -f latin1 -t utf-8 in.json > out.json` for a Latin-1 file)")
        elif "lone surrogate" in detail:
            hint = (" (no Unicode character: Python's json.dump writes a file name that is not UTF-8, as listed "
                    "by os.listdir, this way; rename that file to UTF-8 and write the JSON again)")
        elif "invalid char" in detail:
            hint = " (NaN/Infinity literals and a UTF-8 byte-order mark are not JSON: write null; save without BOM)"
        elif "integer overflow" in detail:
            hint = (" (an integer outside the JSON parser's range -(2**63 - 1) .. 2**63 - 1; ids and other "
                    "integers must lie in it)")
        elif "overflow" in detail:
            hint = " (a number beyond float range: write null)"
        first = detail.strip().splitlines()[0] if detail.strip() else "syntax error"
        self.detail = detail
        super().__init__(f"malformed JSON in {path} at byte {position} (line {line}, column {column}): "
                         f"{first}{hint}")


    def __reduce__(self):  # picklable across processes (the image pass runs in a child)
        return (MalformedJSONError, (self.path, self.position, self.line, self.column, self.detail))


_UTF16 = "UTF-16 text (JSON is UTF-8: re-save it as UTF-8)"
_SIGNATURES = ((b"\xff\xfe", _UTF16), (b"\xfe\xff", _UTF16), (b"\xff\xd8\xff", "a JPEG image"),
               (b"\x89PNG", "a PNG image"), (b"\x1f\x8b", "gzip-compressed"), (b"PK\x03\x04", "a zip archive"),
               (b"%PDF", "a PDF"), (b"BM", "a BMP image"), (b"GIF8", "a GIF image"))


def _parser_words(detail: str) -> str:
    """The parser's message as text: the C backend gives it as the repr of bytes (``b'lexical error:
    ...\\n ...'``), which printed escapes and raw bytes in the error line."""
    if detail[:2] in ("b'", 'b"'):
        import ast

        try:
            words = ast.literal_eval(detail)
        except (ValueError, SyntaxError):
            return detail
        if isinstance(words, bytes):
            return words.decode("utf-8", "replace")
    return detail


def _not_json(path: Union[str, Path]) -> str | None:
    """What the file is instead, when its first byte cannot start JSON (a JSON document starts
    with ``{`` or ``[`` after blanks): its kind where the signature is known, else its first bytes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError:
        return None
    body = head.lstrip(b" \t\r\n")
    if not body or body[:1] in b"{[" or body.startswith(b"\xef\xbb\xbf"):  # (a BOM has its own hint)
        return None
    kind = next((name for sig, name in _SIGNATURES if body.startswith(sig)), None)
    return f"it is {kind}" if kind else f"it starts with {body[:8]!r}"


class _CountingReader:
    def __init__(self, fh):
        self.fh, self.bytes_read = fh, 0

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.bytes_read += len(data)
        return data


def locate_json_error(path: Union[str, Path]) -> tuple[int, int, int, str]:
    """(byte offset, line, column, parser message) of the first syntax error in ``path``.

    Returns offset -1 when the file parses cleanly. Two passes at most: chunks to find
    the failing chunk, then that chunk byte by byte.
    """
    def feed(limit_chunk: int) -> tuple[int, str]:
        coro = ijson.basic_parse_coro(ijson.utils.sendable_list(), use_float=True)  # as stream_items
        chunk_idx = 0
        with open(path, "rb") as fh:
            while True:
                data = fh.read(_BUF)
                if not data:
                    break
                if chunk_idx == limit_chunk:
                    base = chunk_idx * _BUF
                    for i in range(len(data)):
                        try:
                            coro.send(data[i:i + 1])
                        except ijson.JSONError as e:
                            return base + i, str(e)
                else:
                    try:
                        coro.send(data)
                    except ijson.JSONError as e:
                        return -(chunk_idx + 2), str(e)  # tells the caller which chunk
                chunk_idx += 1
        try:
            coro.close()
        except ijson.JSONError as e:
            return Path(path).stat().st_size, str(e)
        return -1, ""

    pos, msg = feed(limit_chunk=-1)
    if pos <= -2:
        pos, msg = feed(limit_chunk=-pos - 2)
    if pos < 0:
        return -1, 0, 0, ""
    line, col = 1, 1
    with open(path, "rb") as fh:
        done = 0
        while done < pos:
            data = fh.read(min(_BUF, pos - done))
            if not data:
                break
            nl = data.count(b"\n")
            if nl:
                line += nl
                col = len(data) - data.rfind(b"\n")
            else:
                col += len(data)
            done += len(data)
    return pos, line, col, msg


def stream_items(path: Union[str, Path], prefix: str) -> Iterator[Any]:
    """Yield the values under ``prefix`` (e.g. ``"images.item"``); numbers become floats/ints."""
    with open(path, "rb") as fh:
        try:
            yield from ijson.items(_CountingReader(fh), prefix, use_float=True, buf_size=_BUF)
        except ijson.JSONError as e:
            pos, line, col, msg = locate_json_error(path)
            if pos < 0:  # should not happen; fall back to the parser's own words
                raise MalformedJSONError(path, -1, 0, 0, str(e)) from None
            raise MalformedJSONError(path, pos, line, col, msg) from None
        except UnicodeDecodeError as e:  # ijson's C parser: a \\uD800-\\uDFFF escape that pairs with none
            pos, line, col = _lone_surrogate(path)  # was a bare UnicodeDecodeError naming no file
            raise MalformedJSONError(path, pos, line, col, f"a \\u escape of a lone surrogate ({e.reason})") from None


_SURROGATE = re.compile(rb"\\[uU]([dD][89abAB][0-9a-fA-F]{2})(\\[uU][dD][c-fC-F][0-9a-fA-F]{2})?|"
                        rb"\\[uU][dD][c-fC-F][0-9a-fA-F]{2}")


def _lone_surrogate(path: Union[str, Path]) -> tuple[int, int, int]:
    """(byte offset, line, column) of the first ``\\uD800``-``\\uDFFF`` escape in ``path`` that is
    not half of a pair (a high one followed by a low one), or (-1, 0, 0). Reads the file mapped."""
    with open(path, "rb") as fh:
        try:
            data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file
            return -1, 0, 0
        with data:
            for m in _SURROGATE.finditer(data):
                if m.group(1) is None or m.group(2) is None:  # a low one alone, or a high one unpaired
                    pos = m.start()
                    line = data[:pos].count(b"\n") + 1
                    return pos, line, pos - (data.rfind(b"\n", 0, pos) + 1) + 1
    return -1, 0, 0
