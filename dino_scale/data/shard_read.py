"""Reading a shard's record batches the way Ray Data's Parquet reader reads them.

Training and distributed evaluation read shards through ``ray.data.read_parquet``: a
``pyarrow.dataset`` Parquet fragment per file, read with ``fragment.to_batches`` through a
buffered input stream (Ray 2.60's defaults, ``RAY_DATA_PARQUET_READER_FRAGMENT_*``).
``pyarrow.parquet.ParquetFile.iter_batches`` is another reader, and the two do not refuse the
same damage: a flipped bit in a list column's value count in the footer was read in full by
``ParquetFile``, every record matching its checksums (so ``dino-scale check-data`` passed the
shard: 3 of the 9,408 one-bit changes of a test shard's footer), and refused by the dataset
reader (e.g. ``ArrowInvalid: Column 6 named category_ids expected length 4 but got length 3``), which
failed the run. Every reader of records here (:func:`~.records.iter_records`,
:func:`~.integrity.check_dataset`, the pre-flight's file-name reads) goes
through this module, so what check-data reads is what a run reads. No Ray import.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

__all__ = ["open_shard", "shard_batches", "read_columns"]

# Ray Data's reader settings (ray/data/_internal/datasource/parquet_datasource.py, read from the
# same variables): buffered input streams of 8 MiB instead of whole row groups in memory.
_BUFFERED_ENV = "RAY_DATA_PARQUET_READER_FRAGMENT_USE_BUFFERED_STREAM"
_BUFFER_SIZE_ENV = "RAY_DATA_PARQUET_READER_FRAGMENT_SCAN_BUFFER_SIZE"


def _scan_options(verify_pages: bool) -> pads.ParquetFragmentScanOptions:
    value = os.environ.get(_BUFFERED_ENV)  # parsed as Ray parses it: "true" or "1" is on
    buffered = value is None or value.lower() in ("true", "1")
    kw = {"use_buffered_stream": True, "buffer_size": int(os.environ.get(_BUFFER_SIZE_ENV) or 8 << 20)} \
        if buffered else {}
    return pads.ParquetFragmentScanOptions(page_checksum_verification=bool(verify_pages), **kw)


def open_shard(path: Union[str, Path], verify_pages: bool = False) -> pads.ParquetFileFragment:
    """The shard at local ``path`` as a ``pyarrow.dataset`` Parquet fragment; its footer is read here
    (``fragment.physical_schema``: the shard's Arrow schema). ``verify_pages``: reads check
    Parquet's page checksums (shards written with them). Raises what pyarrow raises on a
    damaged footer (``OSError``, ``pyarrow.ArrowException``)."""
    fmt = pads.ParquetFileFormat(default_fragment_scan_options=_scan_options(verify_pages))
    fragment = fmt.make_fragment(str(Path(path).absolute()), filesystem=pafs.LocalFileSystem())
    fragment.physical_schema  # noqa: B018 - reads the footer now, not at the first batch
    return fragment


def shard_batches(fragment: pads.ParquetFileFragment, columns: Optional[Sequence[str]] = None,
                  batch_rows: int = 256) -> Iterator[pa.RecordBatch]:
    """The record batches (up to ``batch_rows`` rows each, in the file's row order) of a
    fragment from :func:`open_shard`, ``columns`` only (``None``: all). Raises what pyarrow
    raises where a page, its header or its footer entry is damaged, possibly after some batches."""
    return fragment.to_batches(columns=None if columns is None else list(columns), batch_size=int(batch_rows),
                               use_threads=False)


def read_columns(shard: Union[str, Path, pads.ParquetFileFragment], columns: Sequence[str]) -> pa.Table:
    """The ``columns`` of every record of ``shard`` (a local path, or a fragment from
    :func:`open_shard`), with the fragment's scan options, as :func:`shard_batches` reads."""
    fragment = shard if isinstance(shard, pads.ParquetFileFragment) else open_shard(shard)
    return fragment.to_table(columns=list(columns), use_threads=False)
