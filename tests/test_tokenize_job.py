"""The tokenize job end to end on a real local Ray: ImageNet-layout and COCO inputs full of bad
records, determinism, kill-and-resume, and an S3 round trip against a moto server."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.datasets import tiny_clip
from tests.helpers import kill_after_commits
import torch
import yaml
from PIL import Image

from pipeline import shards, storage
from pipeline.commits import sha256
from pipeline.config import ConfigError, dump_config, load_config
from pipeline.tokenize import TokenizeJobConfig

RES = 32  # 32 px crops, 8 px patches → 4 x 4 = 16 tokens per image


# ---------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def patch_tokenizer(tmp_path_factory):
    """A small PatchVQ fitted on random crops, saved as a state dict; returns (path, tokenizer)."""
    from enat.patch_vq import PatchVQ

    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 3, RES, RES, generator=g)
    tok = PatchVQ.fit(images, codebook_size=32, patch=8, iters=5, seed=0)
    path = tmp_path_factory.mktemp("tok") / "patch_vq.pt"
    torch.save(tok.state_dict(), path)
    return path, PatchVQ.from_state_dict(str(path))


def _config(src_root, out, weights, **over) -> dict:
    cfg = {"source": {"kind": "imagefolder", "root": str(src_root), "splits": ["train"]},
           "image": {"resolution": RES},
           "tokenizer": {"kind": "patch", "weights": str(weights)},
           "tokenize": {"samples_per_shard": 5, "rows_per_entry": 2, "batch_size": 4},
           "output": {"uri": str(out)},
           "compute": {"cpus_per_worker": 0.5, "decode_cpus": 1.0, "progress": True},
           "mlflow": {"enabled": False}}  # tracked in test_world (tokenize → train → sample lineage)
    for k, v in over.items():
        sec, name = k.split("__")
        cfg.setdefault(sec, {})[name] = v
    return cfg


def _run(cfg: dict, tmp_path: Path, *extra: str) -> dict:
    from jobs.tokenize import main

    path = tmp_path / f"cfg-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["--config", str(path), *extra])


def _tars(out: Path, split: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / split).glob("*.tar"))}


def _expected_crop(path: Path, crop: str = "adm") -> np.ndarray:
    from pipeline.images import decode_and_crop

    d = decode_and_crop(path.read_bytes(), RES, crop=crop)
    assert d.ok, d
    return d.array


# ---------------------------------------------------------------------------------------------------
# Config


def test_config_loader_names_bad_fields(tmp_path):
    base = {"source": {"root": "/data"}, "output": {"uri": "/out"}}
    cfg = load_config(TokenizeJobConfig, base, ["tokenize.batch_size=64", "--source.splits=[train, val]",
                                                "storage.endpoint_url=http://127.0.0.1:9000", "ray.num_cpus=null"])
    assert cfg.tokenize.batch_size == 64 and cfg.source.splits == ("train", "val")
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9000"
    assert load_config(TokenizeJobConfig, yaml.safe_load(dump_config(cfg))) == cfg
    cases = [
        (["tokenize.batchsize=3"], "tokenize.batchsize"),
        (["tokenize.batch_size=abc"], "tokenize.batch_size"),
        (["tokenize.batch_size=1.5"], "tokenize.batch_size"),
        (["image.resolution=true"], "image.resolution"),
        (["tokenize.flips=sometimes"], "tokenize.flips"),
        (["nosection.x=1"], "nosection"),
        (["tokenize.batch_size=0"], "batch_size"),
    ]
    for overrides, field in cases:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(TokenizeJobConfig, base, overrides)
    with pytest.raises(ConfigError, match=r"source\.colour"):
        load_config(TokenizeJobConfig, {**base, "source": {"root": "/d", "colour": 1}})
    with pytest.raises(ConfigError, match=r"source\.root"):
        load_config(TokenizeJobConfig, {"output": {"uri": "/o"}})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(base))
    assert load_config(TokenizeJobConfig, p).source.root == "/data"


def test_old_keys_are_rejected_naming_the_new_ones(tmp_path):
    from jobs.tokenize import parse_args

    p = tmp_path / "old.yaml"
    p.write_text(yaml.safe_dump({"source": {"root": "/data"}, "tokenize": {"out": "/out", "batch_size": 8}}))
    cases = [(["--config", str(p)], "tokenize.out", "output.uri"),  # in YAML
             (["source.root=/d", "tokenize.out=/o"], "tokenize.out", "output.uri"),  # as an override
             (["tokenize.encode_actors=4"], "tokenize.encode_actors", "compute.workers"),
             (["tokenize.precision=bf16"], "tokenize.precision", "tokenizer.precision")]
    for argv, old, new in cases:
        with pytest.raises(ConfigError, match=rf"{old}: renamed to {new}".replace(".", r"\.")):
            parse_args(argv)
    with pytest.raises(ConfigError, match=r"tokenizer\.precision: 'bfloat16' is spelled 'bf16'"):
        parse_args(["source.root=/d", "output.uri=/o", "tokenizer.precision=bfloat16"])


def test_preset_parses():
    from jobs.tokenize import parse_args

    cfg = parse_args(["--preset", "imagenet-256", "source.root=s3://data/in", "output.uri=s3://tok/in256",
                      "compute.workers=8", "compute.gpus_per_worker=1"])
    assert cfg.source.splits == ("train", "val") and cfg.image.resolution == 256 and cfg.tokenizer.kind == "vqgan"
    assert cfg.tokenize.samples_per_shard == 1000 and cfg.compute.workers == 8
    assert not cfg.compute.decode_in_worker()  # GPU actors: decode runs in CPU tasks


# ---------------------------------------------------------------------------------------------------
# ImageNet layout


def test_imagenet_layout_end_to_end(ray_cluster, image_folder, make_folder, patch_tokenizer, tmp_path, capsys,
                                    monkeypatch):
    """Also: a relative output.uri is resolved on the driver (the cluster's workers run in other working
    directories, tests/services.py), so every worker writes into the driver's ./out."""
    weights, tok = patch_tokenizer
    make_folder(image_folder.root, split="val", per_class=2, bad=False, seed=1)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    cfg = _config(image_folder.root, "out", weights, source__splits=["train", "val"])
    summary = _run(cfg, tmp_path)
    printed = capsys.readouterr()
    assert "[tokenize] train: read" in printed.out and "rejected" in printed.out

    # --- counts: nothing vanishes
    files = image_folder.files
    s = summary["splits"]["train"]
    expected_rejects = {rel: r for rel, r in files.items() if r is not None}
    assert s["read"] == len(files)
    assert s["rejected"] == len(expected_rejects)
    assert s["written"] == len(files) - len(expected_rejects)
    assert s["converted"] == len(image_folder.converted)
    assert s["read"] == s["written"] + s["rejected"]

    # --- rejects.parquet: every bad input, with its reason
    rej = pq.read_table(out / "train" / "rejects.parquet").to_pylist()
    assert {r["path"]: r["reason"] for r in rej} == expected_rejects
    assert all(r["detail"] for r in rej)

    # --- manifest: one row per shard, hashes and counts match the tars
    man = pq.read_table(out / "train" / "manifest.parquet").to_pylist()
    tars = _tars(out, "train")
    assert [m["name"] for m in man] == sorted(tars)
    for m in man:
        assert sha256(tars[m["name"]]) == m["sha256"] and m["bytes"] == len(tars[m["name"]])
    assert sum(m["samples"] for m in man) == s["written"]

    # --- rows: official order and labels, tokens == the tokenizer on the official crop (+ flip)
    rows = shards.Rows.concat([shards.read_shard_bytes(tars[m["name"]]) for m in man])
    kept = sorted((rel for rel, r in files.items() if r is None), key=lambda p: p.split("/"))
    assert rows.paths == kept
    assert rows.keys == [p.split("/", 1)[1].rsplit(".", 1)[0] for p in kept]
    assert list(rows.index) == sorted(rows.index) and len(set(rows.index)) == len(rows.index)
    classes = image_folder.classes
    assert list(rows.cls) == [classes.index(p.split("/")[1]) for p in kept]
    crops = np.stack([_expected_crop(image_folder.root / p) for p in kept])
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    np.testing.assert_array_equal(rows.tokens, tok.encode(x).reshape(len(kept), -1).numpy())
    np.testing.assert_array_equal(rows.tokens_flip, tok.encode(x.flip(-1)).reshape(len(kept), -1).numpy())
    assert rows.tokens.shape == (len(kept), (RES // 8) ** 2)

    # --- val: own manifest, no flips, same label map
    val = shards.Rows.concat([shards.read_shard_bytes(b) for b in _tars(out, "val").values()])
    assert val.tokens_flip is None and len(val) == 6
    assert summary["splits"]["val"]["rejected"] == 0

    # --- dataset.json
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["classes"] == classes and ds["num_classes"] == 3
    assert ds["label_map"] == {c: i for i, c in enumerate(classes)}
    assert ds["resolution"] == RES and ds["grid"] == [4, 4] and ds["seq_len"] == 16
    assert ds["codebook_size"] == 32 == ds["tokenizer"]["codebook_size"]
    import hashlib

    assert ds["tokenizer"]["weights_sha256"] == hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    assert ds["splits"]["train"]["samples"] == s["written"] and ds["splits"]["train"]["flips"] is True
    assert ds["splits"]["val"]["flips"] is False
    n = len(man)
    assert ds["splits"]["train"]["pattern"] == f"train-{{000000..{n - 1:06d}}}.tar"
    assert ds["created"] and "git" in ds["code_version"] and ds["config"]["image"]["resolution"] == RES

    # --- rerun: every shard is skipped and nothing changes
    manifest_bytes = (out / "train" / "manifest.parquet").read_bytes()
    again = _run(cfg, tmp_path)
    assert again["splits"]["train"]["skipped_shards"] == n
    assert _tars(out, "train") == tars
    assert (out / "train" / "manifest.parquet").read_bytes() == manifest_bytes

    # --- a different tokenizer into the same output is refused, naming the fix
    other = tmp_path / "other.pt"
    sd = torch.load(weights)
    sd = {k: (v + 1 if v.is_floating_point() else v) for k, v in sd.items()}
    torch.save(sd, other)
    with pytest.raises(ConfigError, match="overwrite"):
        _run(_config(image_folder.root, out, other), tmp_path)


def test_imagenet_as_distributed_flat_val_with_label_file(ray_cluster, patch_tokenizer, tmp_path):
    """train/<wnid>/ folders + a flat val/ labelled by the devkit's ground truth and meta.mat."""
    from tests.datasets import make_imagenet_like

    weights, _ = patch_tokenizer
    data = make_imagenet_like(tmp_path / "ilsvrc")
    out = tmp_path / "out"
    cfg = _config(data.root, out, weights, source__splits=["train", "val"],
                  source__labels={"val": data.ground_truth}, source__synsets=data.meta_mat)
    _run(cfg, tmp_path)
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["classes"] == data.classes and ds["source"]["label_files"]["val"].endswith("ground_truth.txt")
    val = shards.Rows.concat([shards.read_shard_bytes(b) for b in _tars(out, "val").values()])
    assert val.keys == sorted(data.val_truth)
    assert list(val.cls) == [data.classes.index(data.val_truth[k]) for k in val.keys]  # the train indices
    train = shards.Rows.concat([shards.read_shard_bytes(b) for b in _tars(out, "train").values()])
    assert list(train.cls) == [data.classes.index(k.split("/")[0]) for k in train.keys]


def test_class_mismatch_fails_before_any_shard_is_written(ray_cluster, make_folder, patch_tokenizer, tmp_path):
    weights, _ = patch_tokenizer
    data = make_folder(tmp_path / "src", per_class=2, bad=False)
    make_folder(data.root, split="val", classes=("n01", "n02", "n04"), per_class=1, bad=False, seed=1)
    out = tmp_path / "out"
    cfg = _config(data.root, out, weights, source__splits=["train", "val"])
    for _ in range(2):  # and the same on a rerun: nothing was committed in between
        with pytest.raises(ConfigError, match=r"split 'val'.*\['n04'\].*\['n03'\]"):
            _run(cfg, tmp_path)
        assert not [p for p in out.rglob("*") if p.is_file()]  # no shard, no commit record, no dataset.json


def test_sixteen_bit_is_rescaled_not_clipped():
    """PIL's convert("RGB") clips 16-bit values at 255; the pipeline scales to 8 bits."""
    import io

    from pipeline.images import decode_and_crop

    arr = np.full((40, 40), 30000, np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    d = decode_and_crop(buf.getvalue(), 32)
    assert d.converted_from == "I;16" and int(d.array.mean()) == 30000 >> 8


# ---------------------------------------------------------------------------------------------------
# Kill midway, rerun: nothing missing, nothing duplicated, same bytes as an uninterrupted run


def test_kill_midway_then_rerun_is_complete_and_identical(ray_cluster, make_folder, patch_tokenizer, tmp_path,
                                                          subprocess_env):
    weights, _ = patch_tokenizer
    data = make_folder(tmp_path / "src", per_class=10, bad=False, seed=3)
    n_images = len(data.files)
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    base = _config(data.root, ref_out, weights, tokenize__samples_per_shard=2)
    _run(base, tmp_path)  # the uninterrupted reference

    cfg = _config(data.root, out, weights, tokenize__samples_per_shard=2, compute__throttle_s=0.4,
                  compute__progress=False)
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = ray_cluster.driver_env(subprocess_env)  # its own driver process on the session's cluster
    log = open(tmp_path / "killed.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.tokenize", "--config", str(path)], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    parts = out / "train" / "_parts"
    try:
        committed = kill_after_commits(proc, parts, 2, tmp_path / "killed.log", "shard")
    finally:
        log.close()
    n_shards = -(-n_images // 2)
    assert 2 <= committed < n_shards, committed
    assert not (out / "train" / "manifest.parquet").exists()  # readers see no dataset yet
    assert not (out / "dataset.json").exists()

    summary = _run(cfg, tmp_path)  # rerun, in this process
    s = summary["splits"]["train"]
    assert s["skipped_shards"] >= committed and s["written"] == n_images
    assert not list((out / "train").glob(f".*{storage.TMP_MARK}*"))  # no temp left behind
    man = pq.read_table(out / "train" / "manifest.parquet").to_pylist()
    keys = [k for m in man for k in shards.read_shard_bytes((out / "train" / m["name"]).read_bytes()).keys]
    assert len(keys) == len(set(keys)) == n_images  # nothing missing, nothing duplicated
    # deterministic: the resumed output is byte-identical to the uninterrupted run
    assert _tars(out, "train") == _tars(ref_out, "train")
    assert (out / "train" / "manifest.parquet").read_bytes() == (ref_out / "train" / "manifest.parquet").read_bytes()


# ---------------------------------------------------------------------------------------------------
# COCO


def test_coco_captions_and_text_features(ray_cluster, coco_data, patch_tokenizer, tmp_path):
    from pipeline.text import RandomTextEncoder

    weights, tok = patch_tokenizer
    out = tmp_path / "coco-out"
    cfg = _config(coco_data.root, out, weights, source__kind="coco", source__splits=["train2014"],
                  text__kind="random", text__dim=32, text__seed=7, tokenize__samples_per_shard=3)
    summary = _run(cfg, tmp_path)
    s = summary["splits"]["train2014"]
    assert s["written"] == len(coco_data.captions)
    rej = pq.read_table(out / "train2014" / "rejects.parquet").to_pylist()
    assert {r["key"]: r["reason"] for r in rej} == coco_data.rejects
    assert s["read"] == s["written"] + s["rejected"]

    man = pq.read_table(out / "train2014" / "manifest.parquet").to_pylist()
    rows = shards.Rows.concat([shards.read_shard_bytes((out / "train2014" / m["name"]).read_bytes()) for m in man])
    assert rows.keys == sorted(coco_data.captions, key=lambda k: int(k.rsplit("_", 1)[1]))  # by image id
    assert {k: c for k, c in zip(rows.keys, rows.captions)} == coco_data.captions
    assert rows.tokens_flip is not None  # train split: flips as for ImageNet
    # U-ViT's COCO crop (short-side square + Lanczos), not ADM's: the pipeline of the COCO FID statistics
    files = [coco_data.root / "train2014" / f"{k}.jpg" for k in rows.keys]
    x = torch.from_numpy(np.stack([_expected_crop(f, "uvit") for f in files])).permute(0, 3, 1, 2).float() / 255
    np.testing.assert_array_equal(rows.tokens, tok.encode(x).reshape(len(files), -1).numpy())
    np.testing.assert_array_equal(rows.tokens_flip, tok.encode(x.flip(-1)).reshape(len(files), -1).numpy())
    enc = RandomTextEncoder(dim=32, length=77, seed=7)
    flat = [c for caps in rows.captions for c in caps]
    assert rows.text.shape == (len(flat), 77, 32) and rows.text.dtype == np.float16
    np.testing.assert_allclose(rows.text.astype(np.float32), enc.encode(flat).astype(np.float32), atol=2e-3)
    empty = np.load(out / "empty_context.npy")
    np.testing.assert_allclose(empty.astype(np.float32), enc.encode([""])[0].astype(np.float32), atol=2e-3)
    assert not np.allclose(empty, rows.text[0])
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["text"]["kind"] == "random" and ds["text"]["empty_context"] == "empty_context.npy"
    assert ds["num_classes"] == 0 and ds["source"]["crop"] == "uvit"


# ---------------------------------------------------------------------------------------------------
# S3 round trip (moto server): source, weights and output on object storage


def test_s3_round_trip(ray_cluster, s3_bucket, s3_upload, image_folder, patch_tokenizer, tmp_path):
    from pipeline.readers import InMemoryReader

    weights, _ = patch_tokenizer
    fs = s3_bucket.fs
    s3_upload(fs, image_folder.root, f"{s3_bucket.bucket}/src")
    fs.pipe_file(f"{s3_bucket.bucket}/weights/tok.pt", Path(weights).read_bytes())
    cfg = _config(s3_bucket.url("src"), s3_bucket.url("tok"), s3_bucket.url("weights/tok.pt"))
    cfg["storage"] = {"endpoint_url": s3_bucket.endpoint}
    summary = _run(cfg, tmp_path)
    local = tmp_path / "local"
    _run(_config(image_folder.root, local, weights), tmp_path)

    # the same bytes as a local run, read back through s3fs
    man = shards.read_manifest(fs, f"{s3_bucket.bucket}/tok/train/manifest.parquet")
    for m in man:
        assert fs.cat_file(f"{s3_bucket.bucket}/tok/train/{m['name']}") == (local / "train" / m["name"]).read_bytes()
    assert summary["splits"]["train"]["rejected"] == sum(r is not None for r in image_folder.files.values())
    rej = shards.read_rejects(fs, f"{s3_bucket.bucket}/tok/train/rejects.parquet")
    assert len(rej) == summary["splits"]["train"]["rejected"]

    reader = InMemoryReader(s3_bucket.url("tok"), "train", batch_size=2, storage_cfg=s3_bucket.storage,
                            drop_last=False)
    seen = [k for b in reader for k in b["key"]]
    assert set(seen) == set(reader.rows.keys) and len(reader.rows) == summary["splits"]["train"]["written"]


# (the same entrypoint under `ray job submit`, through `enat submit`: tests/test_submit.py)


# ---------------------------------------------------------------------------------------------------
# CLIP text tower (transformers), loaded from a local directory and from S3


def test_clip_text_encoder_local_and_s3(tmp_path, s3_bucket, s3_upload):
    pytest.importorskip("transformers")
    from transformers import CLIPTextModel, CLIPTokenizer

    from pipeline.text import TextConfig
    from pipeline.text import build_text_encoder, empty_context

    d = tmp_path / "clip"
    tiny_clip(d)
    caps = ["a photo of a cat", "two dogs on a sofa, " * 20]  # the second is longer than 77 tokens
    enc = build_text_encoder(TextConfig(kind="clip", weights=str(d)))
    out = enc.encode(caps)
    assert out.shape == (2, 77, 32) and out.dtype == np.float16 and enc.dim == 32
    # as U-ViT's FrozenCLIPEmbedder: pad/truncate to 77, last_hidden_state
    tok, model = CLIPTokenizer.from_pretrained(d), CLIPTextModel.from_pretrained(d).eval()
    ids = tok(caps, truncation=True, max_length=77, padding="max_length", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state.numpy()
    np.testing.assert_allclose(out.astype(np.float32), ref, atol=2e-3, rtol=2e-3)
    assert empty_context(enc).shape == (77, 32)
    # the same weights from an object store
    s3_upload(s3_bucket.fs, d, f"{s3_bucket.bucket}/clip")
    remote = build_text_encoder(TextConfig(kind="clip", weights=s3_bucket.url("clip")), storage_cfg=s3_bucket.storage)
    np.testing.assert_array_equal(remote.encode(caps), out)
    assert remote.identity()["weights_sha256"] == enc.identity()["weights_sha256"]
    with pytest.raises(ValueError, match="text.weights"):
        build_text_encoder(TextConfig(kind="clip"))
