"""pipeline.readers: exact epochs / equal batch counts / resume for the in-memory reader, and the
streaming reader's sharding (every sample once across 2 ranks x 2 workers), modes and S3 access."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from pipeline import shards, storage
from pipeline.commits import sha256
from pipeline.readers import InMemoryReader, ReaderConfig, make_reader
from pipeline.streaming import StreamingReader
from tests.services import HANG_GUARD_S

L, K = 16, 10  # tokens per row, classes


def write_dataset(root: str, split: str = "train", n: int = 50, per_shard: int = 7, per_entry: int = 3,
                  flips: bool = True, text: bool = False, storage_cfg=None, seed: int = 0,
                  text_dims: tuple[int, int] = (6, 4), captions_per_image: int = 0) -> shards.Rows:
    """A small tokenized split in the tokenize job's layout (shards, manifest, dataset.json); caption
    features ``text_dims`` (T, D) each, ``captions_per_image`` per image (0: 1 to 3)."""
    rng = np.random.default_rng(seed)
    caps = [[f"image {i} caption {j}" for j in range(captions_per_image or 1 + i % 3)]
            for i in range(n)] if text else None
    rows = shards.Rows(keys=[f"k{i:04d}" for i in range(n)], paths=[f"{split}/x/k{i}.JPEG" for i in range(n)],
                       index=np.arange(n), cls=(np.arange(n) % K) if not text else np.full(n, -1),
                       tokens=rng.integers(0, 512, (n, L)), tokens_flip=rng.integers(512, 1024, (n, L)) if flips else None,
                       captions=caps,
                       text=rng.standard_normal((sum(map(len, caps)), *text_dims)).astype(np.float16)
                       if text else None)
    fs, path = storage.filesystem(root, storage_cfg)
    recs = []
    for s, start in enumerate(range(0, n, per_shard)):
        part = rows.slice(start, start + per_shard)
        data = shards.pack_shard(part, s, per_entry)
        name = f"{split}-{s:06d}.tar"
        storage.put_atomic(fs, f"{path}/{split}/{name}", data)
        recs.append({"name": name, "shard": s, "samples": len(part), "rows": len(part) * (1 + flips),
                     "bytes": len(data), "sha256": sha256(data), "first_key": part.keys[0],
                     "last_key": part.keys[-1]})
    shards.write_manifest(fs, f"{path}/{split}/manifest.parquet", recs)
    ds = {"seq_len": L, "num_classes": 0 if text else K, "splits": {split: {"flips": flips, "samples": n}},
          "text": {"kind": "random", "empty_context": "empty_context.npy"} if text else None}
    if text:
        storage.put_atomic(fs, f"{path}/empty_context.npy", shards.npy_bytes(np.full(text_dims, 7, np.float16)))
    shards.write_json(fs, f"{path}/dataset.json", ds)
    return rows


@pytest.fixture
def dataset(tmp_path):
    root = str(tmp_path / "tok")
    return root, write_dataset(root)


# ---------------------------------------------------------------------------------------------------
# In memory


def test_memory_reader_exact_epoch_equal_batches_across_ranks(dataset):
    root, rows = dataset
    readers = [InMemoryReader(root, batch_size=4, rank=r, world_size=2, seed=1) for r in range(2)]
    assert len(readers[0]) == len(readers[1]) == 50 // 8
    seen = Counter()
    for rd in readers:
        batches = list(rd)
        assert len(batches) == 6 and all(b["tokens"].shape == (4, L) for b in batches)
        for b in batches:
            assert b["tokens"].dtype == torch.int64 and b["label"].dtype == torch.int64
            for tok, idx, fl, lab in zip(b["tokens"], b["index"], b["flipped"], b["label"]):
                src = rows.tokens_flip if fl else rows.tokens
                assert torch.equal(tok, torch.from_numpy(src[idx].astype(np.int64)))
                assert lab == rows.cls[idx]
            seen.update(b["index"].tolist())
    assert len(seen) == 48 and max(seen.values()) == 1  # exact: no sample twice in an epoch
    flips = [f for b in readers[0].batch(0, 0)["flipped"].tolist() for f in [b]]
    assert readers[0].epoch == 1 and readers[0].step == 0  # the next iteration is the next epoch
    # epochs differ, and the flip choice is per sample per epoch
    e0 = torch.cat([readers[0].batch(0, s)["index"] for s in range(6)])
    e1 = torch.cat([readers[0].batch(1, s)["index"] for s in range(6)])
    assert not torch.equal(e0, e1)
    allflips = torch.cat([readers[0].batch(e, s)["flipped"] for e in range(3) for s in range(6)])
    assert 0.2 < allflips.float().mean() < 0.8, flips


def test_memory_reader_resume_from_epoch_and_step(dataset):
    root, _ = dataset
    full = InMemoryReader(root, batch_size=3, rank=1, world_size=2, seed=5, p_uncond=0.3)
    list(full)  # epoch 0
    epoch1 = list(full)
    resumed = InMemoryReader(root, batch_size=3, rank=1, world_size=2, seed=5, p_uncond=0.3, epoch=1, step=4)
    rest = list(resumed)
    assert len(rest) == len(epoch1) - 4
    for a, b in zip(rest, epoch1[4:]):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["label"], b["label"])
    state = full.state_dict()
    again = InMemoryReader(root, batch_size=3, rank=1, world_size=2, seed=5, p_uncond=0.3)
    again.load_state_dict(state)
    assert again.state_dict() == {"epoch": 2, "step": 0}
    # p_uncond: label -> num_classes for about that fraction, as the official CFGDataset
    labels = torch.cat([full.batch(e, s)["label"] for e in range(4) for s in range(len(full))])
    dropped = (labels == K).float().mean().item()
    assert 0.15 < dropped < 0.45, dropped


def test_memory_reader_padding_and_both_flips(dataset):
    root, rows = dataset
    pad = [InMemoryReader(root, batch_size=4, rank=r, world_size=2, drop_last=False, flip="none") for r in range(2)]
    assert len(pad[0]) == len(pad[1]) == 7  # ceil(50 / 8), the last global batch wraps around
    idx = [i for rd in pad for b in rd for i in b["index"].tolist()]
    assert set(idx) == set(range(50)) and len(idx) == 56
    assert not any(b["flipped"].any() for b in pad[0])
    both = [InMemoryReader(root, batch_size=5, rank=r, world_size=2, flip="both") for r in range(2)]
    pairs = Counter((i, f) for rd in both for b in rd for i, f in zip(b["index"].tolist(), b["flipped"].tolist()))
    assert len(pairs) == 100 and max(pairs.values()) == 1  # every image plain and flipped, once each


def test_memory_reader_rejects_corrupt_shard(dataset):
    root, _ = dataset
    p = Path(root) / "train" / "train-000001.tar"
    data = bytearray(p.read_bytes())
    data[600] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="train-000001.tar: sha256"):
        InMemoryReader(root, batch_size=2)
    with pytest.raises(ValueError, match="no flipped tokens"):
        write_dataset(str(Path(root).parent / "noflip"), flips=False)
        InMemoryReader(str(Path(root).parent / "noflip"), batch_size=2, flip="random")


# ---------------------------------------------------------------------------------------------------
# Streaming


_RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    from pipeline.sections import StorageConfig
    from pipeline.streaming import StreamingReader
    rank = int(sys.argv[1])
    rd = StreamingReader({root!r}, "train", batch_size=3, rank=rank, world_size=2, num_workers=2, seed=3,
                         shuffle_buffer=8, storage_cfg=StorageConfig(endpoint_url={endpoint!r}))
    out = []
    for b in rd:
        out += list(zip(b["index"].tolist(), b["key"]))
    print(json.dumps(out))
""")


def test_streaming_every_sample_once_across_2_ranks_x_2_workers_on_s3(s3_bucket, tmp_path, subprocess_env):
    """Each rank is its own process (2 DataLoader workers each), reading the shards from S3."""
    root = s3_bucket.url("tok")
    rows = write_dataset(root, n=61, per_shard=6, storage_cfg=s3_bucket.storage)  # 11 shards
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT.format(root=root, endpoint=s3_bucket.endpoint))
    env = subprocess_env
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for r in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=HANG_GUARD_S)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    per_rank = [[i for i, _ in r] for r in results]
    assert all(per_rank)  # both ranks got data
    everything = per_rank[0] + per_rank[1]
    assert sorted(everything) == list(range(61))  # every sample exactly once
    assert all(k == rows.keys[i] for r in results for i, k in r)
    assert per_rank[0] != sorted(per_rank[0])  # shuffled


def test_streaming_modes_are_deterministic_and_resumable(tmp_path):
    root = str(tmp_path / "coco")
    rows = write_dataset(root, n=40, per_shard=5, text=True)
    kw = dict(batch_size=4, num_workers=2, seed=9, shuffle_buffer=10, p_uncond=0.25)
    a = list(StreamingReader(root, **kw))
    b = list(StreamingReader(root, **kw))
    assert [x["key"] for x in a] == [x["key"] for x in b]  # same seed, same stream
    assert sorted(k for x in a for k in x["key"]) == rows.keys
    batch = a[0]
    assert batch["context"].shape == (4, 6, 4) and batch["context"].dtype == torch.float16
    assert "label" not in batch  # caption dataset: no classes
    empty = np.full((6, 4), 7, np.float16)
    n_drop, captions_used = 0, Counter()
    for x in a:
        for key, ctx, cap in zip(x["key"], x["context"].numpy(), x["caption"]):
            i = rows.keys.index(key)
            if cap == "":
                n_drop += 1
                np.testing.assert_array_equal(ctx, empty)  # dropped → the empty-caption embedding
            else:
                c = rows.captions[i].index(cap)
                np.testing.assert_array_equal(ctx, rows.text[rows.text_offsets[i] + c])
                captions_used[c] += 1
    assert 0 < n_drop < 25 and len(captions_used) > 1  # captions are chosen at random
    # resume from (epoch, step) by deterministic replay
    resumed = StreamingReader(root, **kw, step=3)
    assert [x["key"] for x in resumed] == [x["key"] for x in a[3:]]
    # next epoch: another order
    rd = StreamingReader(root, **kw)
    list(rd)
    assert rd.state_dict() == {"epoch": 1, "step": 0}
    assert [x["key"] for x in rd] != [x["key"] for x in a]


class CountingFileSystem(LocalFileSystem):
    """``counting:///abs/path``: the local filesystem, counting every byte read through it."""

    protocol = ("counting",)
    bytes_read = 0

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        return super()._strip_protocol(path[len("counting://"):] if path.startswith("counting://") else path)

    def _open(self, path, mode="rb", **kw):
        f = super()._open(path, mode, **kw)
        read = f.read

        def counted(*args, **kwargs):
            data = read(*args, **kwargs)
            CountingFileSystem.bytes_read += len(data)
            return data

        f.read = counted
        return f


def test_streaming_reads_only_the_caption_features_it_uses(tmp_path):
    """Of 5 caption features per image the stream fetches the one it uses (counted at the filesystem)."""
    fsspec.register_implementation("counting", CountingFileSystem, clobber=True)
    n, caps, dims = 24, 5, (77, 64)  # one caption feature = 77·64 float16 = 9,856 bytes
    rows = write_dataset(str(tmp_path / "coco"), n=n, per_shard=8, per_entry=4, text=True, text_dims=dims,
                         captions_per_image=caps)
    root = f"counting://{tmp_path / 'coco'}"
    man = shards.read_manifest(*storage.filesystem(str(tmp_path / "coco" / "train" / "manifest.parquet")))
    total = sum(m["bytes"] for m in man)
    feature = int(np.prod(dims)) * 2
    chunk = 4096
    CountingFileSystem.bytes_read = 0
    got = list(StreamingReader(root, batch_size=4, num_workers=0, seed=1, shuffle_buffer=0, p_uncond=0.0,
                               range_chunk=chunk))
    read = CountingFileSystem.bytes_read
    for b in got:  # the right features still
        for key, ctx, cap in zip(b["key"], b["context"].numpy(), b["caption"]):
            i = rows.keys.index(key)
            np.testing.assert_array_equal(ctx, rows.text[rows.text_offsets[i] + rows.captions[i].index(cap)])
    assert sum(len(b["key"]) for b in got) == n
    small = total - n * caps * feature  # tar headers, tokens, keys, captions …
    entries = -(-n // 4)
    # every used feature once, the small members, and at most two chunks of overhead per tar entry
    assert n * feature <= read <= n * feature + small + 2 * entries * chunk, (read, total)
    assert read < total / 2


def test_streaming_resampled_equal_batch_counts(dataset):
    root, rows = dataset
    counts = []
    for r in range(2):
        rd = StreamingReader(root, batch_size=4, rank=r, world_size=2, num_workers=2, resampled=True,
                             batches_per_epoch=5, flip="random", shuffle_buffer=4, drop_last=True)
        got = list(rd)
        counts.append(len(got))
        for b in got:
            for tok, idx, fl in zip(b["tokens"], b["index"], b["flipped"]):
                src = rows.tokens_flip if fl else rows.tokens
                assert torch.equal(tok, torch.from_numpy(src[idx].astype(np.int64)))
    assert counts == [5, 5]


def test_make_reader_from_config(dataset):
    root, _ = dataset
    mem = make_reader(ReaderConfig(kind="memory", root=root, batch_size=5), rank=0, world_size=1)
    assert isinstance(mem, InMemoryReader) and len(mem) == 10
    st = make_reader(ReaderConfig(kind="stream", root=root, batch_size=5, num_workers=0, shuffle_buffer=0,
                                  shuffle_shards=False, flip="none"))
    assert [i for b in st for i in b["index"].tolist()] == list(range(50))  # no shuffling: stable order


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_stream_reader_never_yields_rows_of_a_damaged_shard(tmp_path, damage):
    """Token-only shards streamed by DataLoader workers are checked against the manifest before any row is
    used: a flipped bit or a shard cut mid-member fails naming the shard, before its rows reach a batch."""
    from pipeline.errors import DataError
    root = str(tmp_path / "tok")
    write_dataset(root, n=24, per_shard=6)
    shards = sorted((tmp_path / "tok" / "train").glob("*.tar"))
    bad = shards[1]
    data = bytearray(bad.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 1
    else:
        data = data[: len(data) // 2]
    bad.write_bytes(bytes(data))
    reader = StreamingReader(root, batch_size=2, num_workers=1, shuffle_shards=False, shuffle_buffer=0)
    seen = []
    with pytest.raises(DataError) as e:
        for batch in reader:
            seen += batch["key"]
    assert str(e.value) == f"{bad}: sha256 differs from the manifest (corrupt or replaced shard)"
    assert len(seen) <= 6  # at most the first shard's rows; none of the damaged one
