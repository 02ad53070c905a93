"""pipeline.shards: packed entries, byte-reproducible tars, manifest / rejects schemas."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import shards, storage
from pipeline.ranged import RangeReader


def _rows(n: int, L: int = 16, seed: int = 0, flips: bool = True, text: bool = False, start: int = 0) -> shards.Rows:
    rng = np.random.default_rng(seed)
    caps = [[f"caption {i}.{j}" for j in range(1 + i % 3)] for i in range(n)] if text else None
    return shards.Rows(keys=[f"k{start + i:05d}" for i in range(n)], paths=[f"train/c/k{start + i}.JPEG" for i in range(n)],
                       index=np.arange(start, start + n), cls=rng.integers(0, 10, n),
                       tokens=rng.integers(0, 1024, (n, L)),
                       tokens_flip=rng.integers(0, 1024, (n, L)) if flips else None,
                       captions=caps,
                       text=rng.standard_normal((sum(map(len, caps)), 5, 8)).astype(np.float16) if text else None)


def test_pack_unpack_round_trip_and_packing():
    rows = _rows(25, text=False)
    data = shards.pack_shard(rows, shard=3, rows_per_entry=10)
    entries = list(shards.iter_tar_entries(data))
    assert [e["__key__"] for e in entries] == ["000003_00000", "000003_00001", "000003_00002"]
    assert sorted(entries[0]) == ["__key__", "cls.npy", "idx.npy", "keys.json", "paths.json", "tokens.npy",
                                  "tokens_flip.npy"]
    back = shards.read_shard_bytes(data)
    assert back.keys == rows.keys and back.paths == rows.paths
    np.testing.assert_array_equal(back.tokens, rows.tokens)
    np.testing.assert_array_equal(back.tokens_flip, rows.tokens_flip)
    np.testing.assert_array_equal(back.cls, rows.cls)
    np.testing.assert_array_equal(back.index, rows.index)
    assert back.tokens.dtype == np.uint16 and back.cls.dtype == np.int32
    # packing: 1000-row entries cost ~ the payload (512 B tokens + label, index, key, path); one row per
    # entry pays 3 x 512 B of headers and padding per member (ecosystem §3.5)
    big = _rows(1000, L=256, flips=False)
    per_row = len(shards.pack_shard(big, 0, 1000)) / 1000
    one_by_one = len(shards.pack_shard(big, 0, 1)) / 1000
    assert per_row < 600 and one_by_one > 4 * per_row, (per_row, one_by_one)


def test_text_rows_round_trip():
    rows = _rows(7, text=True)
    back = shards.read_shard_bytes(shards.pack_shard(rows, 0, rows_per_entry=3))
    assert back.captions == rows.captions
    np.testing.assert_array_equal(back.text, rows.text)
    np.testing.assert_array_equal(back.text_offsets, rows.text_offsets)
    assert back.text.dtype == np.float16
    part = rows.slice(2, 5)
    assert part.captions == rows.captions[2:5]
    np.testing.assert_array_equal(part.text, rows.text[rows.text_offsets[2]:rows.text_offsets[5]])


def test_ranged_entries_equal_the_plain_ones_and_fetch_rows_on_demand(tmp_path):
    rows = _rows(9, text=True)
    data = shards.pack_shard(rows, 0, rows_per_entry=4)
    (tmp_path / "s.tar").write_bytes(data)
    fs, path = storage.filesystem(str(tmp_path / "s.tar"))
    reader = RangeReader(fs, path, len(data), chunk=1024)
    ranged = list(shards.iter_tar_entries_ranged(reader))
    plain = list(shards.iter_tar_entries(data))
    assert [sorted(e) for e in ranged] == [sorted(e) for e in plain]
    for r, p in zip(ranged, plain):
        assert all(r[k] == p[k] for k in p if k != "text.npy")
        lazy, full = r["text.npy"], np.load(io.BytesIO(p["text.npy"]))
        assert lazy.shape == full.shape and lazy.dtype == np.float16
        for i in range(len(full)):
            np.testing.assert_array_equal(lazy[i], full[i])
        with pytest.raises(IndexError, match="text.npy: row"):
            lazy[len(full)]
    back = shards.Rows.concat([shards.unpack_entry(e) for e in plain])
    first = shards.unpack_entry(ranged[0])  # Rows accepts the lazy member as its text
    np.testing.assert_array_equal(first.text[2], back.text[2])


def test_tars_are_byte_reproducible_and_standard():
    a = shards.pack_shard(_rows(30), 1, 8)
    b = shards.pack_shard(_rows(30), 1, 8)
    assert a == b
    assert a != shards.pack_shard(_rows(30, seed=1), 1, 8)
    with tarfile.open(fileobj=io.BytesIO(a)) as tf:  # any tar tool reads it
        members = tf.getmembers()
        assert all(m.mtime == 0 for m in members)
        assert members[0].name == "000001_00000.cls.npy"


def test_rows_validation_names_the_problem():
    with pytest.raises(ValueError, match="uint16"):
        shards.Rows(keys=["a"], paths=["p"], index=[0], cls=[0], tokens=np.array([[70000]]))
    with pytest.raises(ValueError, match="tokens_flip"):
        shards.Rows(keys=["a"], paths=["p"], index=[0], cls=[0], tokens=np.zeros((1, 4)),
                    tokens_flip=np.zeros((1, 5)))
    with pytest.raises(ValueError, match="missing member"):
        shards.unpack_entry({"__key__": "x", "keys.json": b"[]"})


def test_empty_shard_round_trip():
    empty = shards.Rows.concat([], seq_len=16)
    data = shards.pack_shard(empty, 0, 10)
    assert len(shards.read_shard_bytes(data, seq_len=16)) == 0


def test_manifest_and_rejects_schema(tmp_path):
    fs, root = storage.filesystem(str(tmp_path))
    recs = [{"name": f"train-{s:06d}.tar", "shard": s, "samples": 10, "rows": 20, "bytes": 123, "sha256": "ab" * 32,
             "first_key": "a", "last_key": "b", "extra": "ignored"} for s in (2, 0, 1)]
    table = shards.write_manifest(fs, f"{root}/manifest.parquet", recs)
    assert table.schema.equals(shards.MANIFEST_SCHEMA)
    back = shards.read_manifest(fs, f"{root}/manifest.parquet")
    assert [r["shard"] for r in back] == [0, 1, 2]
    assert set(back[0]) == set(shards.MANIFEST_SCHEMA.names)
    rej = [{"split": "train", "shard": -1, "key": "x", "path": "train/x.txt", "reason": "extension", "detail": ""}]
    shards.write_rejects(fs, f"{root}/rejects.parquet", rej)
    t = pq.read_table(f"{root}/rejects.parquet")
    assert t.schema.equals(shards.REJECTS_SCHEMA) and t.to_pylist() == rej
    # a manifest with another schema is refused
    import pyarrow as pa

    pq.write_table(pa.table({"name": ["x"]}), f"{root}/bad.parquet")
    with pytest.raises(ValueError, match="schema"):
        shards.read_manifest(fs, f"{root}/bad.parquet")
