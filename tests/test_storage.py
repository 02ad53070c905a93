"""pipeline.storage against the local disk, memory:// and a real S3 API (moto server on 127.0.0.1)."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
import torch

from pipeline import storage
from pipeline.config import ConfigError, load_config
from pipeline.sections import StorageConfig
from tests.services import HANG_GUARD_S


def _second_client(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)


def test_filesystem_factory_maps_every_scheme(tmp_path, s3_bucket):
    fs, path = storage.filesystem(str(tmp_path / "a.txt"))
    assert storage.is_local(fs) and path.endswith("a.txt")
    fs, path = storage.filesystem(f"file://{tmp_path}/a.txt")
    assert storage.is_local(fs) and path == f"{tmp_path}/a.txt"
    fs, path = storage.filesystem("memory://bucket/x/y.bin")
    assert storage.fs_protocol(fs) == "memory" and path.endswith("bucket/x/y.bin")
    fs, path = storage.filesystem(s3_bucket.url("k/v.bin"), s3_bucket.storage)
    assert path == f"{s3_bucket.bucket}/k/v.bin"
    assert fs.endpoint_url == s3_bucket.endpoint
    assert storage.to_url(fs, path) == s3_bucket.url("k/v.bin")
    assert storage.protocol_of("gcs://b/k") == "gs" and storage.protocol_of("/x") == "file"


def test_endpoint_from_standard_aws_env(s3_bucket, monkeypatch):
    """No endpoint in the config: botocore's AWS_ENDPOINT_URL_S3 decides, as for any AWS tool."""
    s3_bucket.fs.pipe_file(f"{s3_bucket.bucket}/env.txt", b"from-env")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_bucket.endpoint)
    fs, path = storage.filesystem(s3_bucket.url("env.txt"), StorageConfig(options={"s3": {"skip_instance_cache": True}}))
    assert fs.cat_file(path) == b"from-env"


def test_put_atomic_and_listing_cache_invalidation(s3_bucket, tmp_path):
    for url, cfg in ((s3_bucket.url("p"), s3_bucket.storage), (str(tmp_path / "p"), None),
                     ("memory://atomic-test/p", None)):
        fs, root = storage.filesystem(url, cfg)
        assert storage.list_files(fs, root) == []
        assert not storage.exists(fs, f"{root}/a.bin")
        # another client writes; our cached listing must not hide it
        storage.put_atomic(fs, f"{root}/a.bin", b"1" * 10)
        if storage.fs_protocol(fs) == "s3":
            other = _second_client(s3_bucket.endpoint)
            other.pipe_file(f"{root}/b.bin", b"2")
        else:
            storage.put_atomic(fs, f"{root}/b.bin", b"2")
        assert [p.rsplit("/", 1)[-1] for p in storage.list_files(fs, root, ".bin")] == ["a.bin", "b.bin"]
        assert storage.exists(fs, f"{root}/b.bin")
        assert fs.cat_file(f"{root}/a.bin") == b"1" * 10


def test_open_atomic_commits_nothing_on_error(s3_bucket, tmp_path):
    """s3fs's own `with open("wb")` commits a partial object on error (ecosystem §8.6); ours must not."""
    for url, cfg in ((s3_bucket.url("o/x.bin"), s3_bucket.storage), (str(tmp_path / "o" / "x.bin"), None),
                     ("memory://atomic-test2/o/x.bin", None)):
        fs, path = storage.filesystem(url, cfg)
        with pytest.raises(RuntimeError):
            with storage.open_atomic(fs, path) as f:
                f.write(b"partial" * 1000)
                raise RuntimeError("boom")
        assert not storage.exists(fs, path), url
        parent = path.rsplit("/", 1)[0]
        assert storage.list_files(fs, parent) == []  # no temp left visible either
        with storage.open_atomic(fs, path) as f:
            f.write(b"complete")
        assert fs.cat_file(path) == b"complete"


def test_s3fs_plain_open_does_commit_partial_objects(s3_bucket):
    """Pins the s3fs behaviour open_atomic works around: if this starts failing, s3fs changed."""
    fs = s3_bucket.fs
    p = f"{s3_bucket.bucket}/raw/partial.bin"
    with pytest.raises(RuntimeError):
        with fs.open(p, "wb") as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert storage.exists(fs, p)


def test_local_put_atomic_leaves_no_temp_on_failure(tmp_path, monkeypatch):
    fs, path = storage.filesystem(str(tmp_path / "d" / "f.bin"))

    def broken_replace(a, b):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        storage.put_atomic(fs, path, b"x" * 100)
    assert not os.path.exists(path)
    assert os.listdir(tmp_path / "d") == []


def test_remove_stale_temps(tmp_path):
    fs, root = storage.filesystem(str(tmp_path))
    (tmp_path / f".a.tar{storage.TMP_MARK}abc").write_bytes(b"x")
    (tmp_path / "a.tar").write_bytes(b"y")
    assert storage.list_files(fs, root) == [f"{root}/a.tar"]
    assert storage.remove_stale_temps(fs, root) == 1
    assert sorted(os.listdir(tmp_path)) == ["a.tar"]


def test_credentials_never_in_config_repr_or_messages(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SuperSecretValue123")
    cfg = StorageConfig(endpoint_url="http://127.0.0.1:9")
    assert "SuperSecret" not in repr(cfg)
    with pytest.raises(ConfigError, match="credentials"):
        load_config(StorageConfig, {"options": {"s3": {"secret": "x"}}})
    msg = ("failed s3://AKIAABCDEFGHIJKLMNOP:pw@bucket/k?X-Amz-Signature=abc&x=1 "
           "aws_secret_access_key=SuperSecretValue123 token: tok123")
    red = storage.redact(msg)
    for secret in ("AKIAABCDEFGHIJKLMNOP", "pw@", "SuperSecretValue123", "abc&", "tok123"):
        assert secret not in red, (secret, red)
    assert "x=1" in red and "bucket/k" in red
    fs, _ = storage.filesystem("s3://b/k", cfg)
    assert "SuperSecret" not in storage.describe(fs) and "127.0.0.1:9" in storage.describe(fs)
    assert "SuperSecret" not in repr(storage.ShardOpener(cfg))


def _tar_with(n_entries: int, shard: int) -> bytes:
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0) as tw:
        for i in range(n_entries):
            tw.write({"__key__": f"{shard:03d}_{i:03d}", "x.txt": f"{shard}-{i}".encode()})
    return buf.getvalue()


def test_webdataset_gopen_scheme_reads_s3(s3_bucket):
    import webdataset as wds

    for s in range(2):
        s3_bucket.fs.pipe_file(f"{s3_bucket.bucket}/wds/s-{s}.tar", _tar_with(3, s))
    storage.register_wds_opener(s3_bucket.storage)
    ds = wds.WebDataset([s3_bucket.url(f"wds/s-{s}.tar") for s in range(2)], shardshuffle=False,
                        empty_check=False).to_tuple("x.txt")
    got = sorted(x.decode() for (x,) in ds)
    assert got == sorted(f"{s}-{i}" for s in range(2) for i in range(3))


def test_shard_opener_pipeline_with_spawn_workers(s3_bucket, tmp_path):
    """The explicit DataPipeline opener works in spawn workers (gopen_schemes is not inherited)."""
    for s in range(4):
        s3_bucket.fs.pipe_file(f"{s3_bucket.bucket}/sp/s-{s}.tar", _tar_with(2, s))
    script = tmp_path / "spawn_read.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch, webdataset as wds
        sys.path.insert(0, {str(os.getcwd())!r})
        from pipeline.storage import ShardOpener
        from pipeline.sections import StorageConfig
        def to_text(sample):
            return sample["x.txt"].decode()
        if __name__ == "__main__":
            urls = [f"s3://{s3_bucket.bucket}/sp/s-{{i}}.tar" for i in range(4)]
            ds = wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker,
                                  ShardOpener(StorageConfig(endpoint_url={s3_bucket.endpoint!r})), wds.map(to_text))
            dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn")
            print(",".join(sorted(dl)))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=HANG_GUARD_S,
                         cwd=os.getcwd())
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().split(",") == sorted(f"{s}-{i}" for s in range(4) for i in range(2))
