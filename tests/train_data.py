"""A small *learnable* token dataset in the tokenize job's layout, with a real (patch k-means)
tokenizer whose weights are stored next to it, for the training and end-to-end tests."""
from __future__ import annotations

import io

import numpy as np
import torch

from enat.patch_vq import PatchVQ
from jobs.core_demo import make_shapes
from pipeline import shards, storage
from pipeline.commits import sha256


def write_shapes_dataset(root: str, n: int = 400, res: int = 16, patch: int = 4, codebook: int = 16,
                         per_shard: int = 100, storage_cfg=None, seed: int = 0) -> dict:
    """Shapes images (10 classes) -> PatchVQ tokens -> shards + manifest + dataset.json under `root`."""
    images, labels = make_shapes(n, res, seed)
    tok = PatchVQ.fit(images, codebook_size=codebook, patch=patch, iters=5, seed=seed)
    codes = tok.encode(images).flatten(1).numpy()
    codes_flip = tok.encode(images.flip(-1)).flatten(1).numpy()
    fs, path = storage.filesystem(root, storage_cfg)
    buf = io.BytesIO()
    torch.save(tok.state_dict(), buf)
    storage.put_atomic(fs, f"{path}/tokenizer.pt", buf.getvalue())
    rows = shards.Rows(keys=[f"k{i:05d}" for i in range(n)], paths=[f"train/c/k{i}.png" for i in range(n)],
                       index=np.arange(n), cls=labels.numpy(), tokens=codes, tokens_flip=codes_flip,
                       captions=None, text=None)
    recs = []
    for s, start in enumerate(range(0, n, per_shard)):
        part = rows.slice(start, start + per_shard)
        data = shards.pack_shard(part, s, 50)
        name = f"train-{s:06d}.tar"
        storage.put_atomic(fs, f"{path}/train/{name}", data)
        recs.append({"name": name, "shard": s, "samples": len(part), "rows": 2 * len(part), "bytes": len(data),
                     "sha256": sha256(data), "first_key": part.keys[0], "last_key": part.keys[-1]})
    shards.write_manifest(fs, f"{path}/train/manifest.parquet", recs)
    L = codes.shape[1]
    ds = {"seq_len": L, "grid": [int(L ** 0.5)] * 2, "codebook_size": codebook, "num_classes": 10,
          "classes": [f"c{i}" for i in range(10)], "splits": {"train": {"flips": True, "samples": n}},
          "tokenizer": {"kind": "patch", "weights": storage.join(root, "tokenizer.pt"), "codebook_size": codebook,
                        "downsample": patch}, "text": None}
    shards.write_json(fs, f"{path}/dataset.json", ds)
    return ds
