"""dino_scale.data.shard_read: shards read as Ray Data's Parquet reader reads them."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dino_scale.data import read_manifest
from dino_scale.data.shard_read import _scan_options, open_shard, read_columns, shard_batches
from test_data_integrity import _convert


def test_data_shard_read_gives_the_rows_parquet_holds_in_file_order(tmp_path):
    out, _ = _convert(tmp_path, extra_boxes=True)
    path = out / read_manifest(out)["shards"][0]["file"]
    want = pq.read_table(path)
    shard = open_shard(path)
    assert shard.physical_schema.equals(want.schema)
    got = pa.Table.from_batches(list(shard_batches(shard, ["image_id", "boxes"], batch_rows=3)))
    assert [b.num_rows for b in shard_batches(shard, ["image_id"], batch_rows=3)] == [3, 1]
    assert got.column("image_id").to_pylist() == want.column("image_id").to_pylist() == [1, 2, 3, 4]
    assert got.column("boxes").to_pylist() == want.column("boxes").to_pylist()
    assert read_columns(path, ["category_ids"]).equals(want.select(["category_ids"]))


def test_data_shard_read_refuses_a_damaged_footer_when_opened(tmp_path):
    out, _ = _convert(tmp_path)
    path = out / read_manifest(out)["shards"][0]["file"]
    data = path.read_bytes()
    path.write_bytes(data[:-204] + bytes(200) + data[-4:])  # the footer overwritten, same size
    with pytest.raises((OSError, pa.ArrowException)):
        open_shard(path)


@pytest.mark.parametrize("value, buffered", [(None, True), ("1", True), ("true", True), ("TRUE", True),
                                             ("0", False), ("false", False), ("yes", False)])
def test_data_shard_read_follows_rays_buffered_stream_setting(monkeypatch, value, buffered):
    """Ray reads RAY_DATA_PARQUET_READER_FRAGMENT_USE_BUFFERED_STREAM as on only for "true" or "1"
    (default on, 8 MiB: RAY_DATA_PARQUET_READER_FRAGMENT_SCAN_BUFFER_SIZE)."""
    for key, v in (("RAY_DATA_PARQUET_READER_FRAGMENT_USE_BUFFERED_STREAM", value),
                   ("RAY_DATA_PARQUET_READER_FRAGMENT_SCAN_BUFFER_SIZE", "1048576")):
        if v is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, v)
    options = _scan_options(verify_pages=True)
    assert options.use_buffered_stream is buffered and options.page_checksum_verification
    if buffered:
        assert options.buffer_size == 1 << 20
    monkeypatch.delenv("RAY_DATA_PARQUET_READER_FRAGMENT_SCAN_BUFFER_SIZE")
    assert not _scan_options(verify_pages=False).page_checksum_verification
    if buffered:
        assert _scan_options(False).buffer_size == 8 << 20
