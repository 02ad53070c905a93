"""The bytes the sample and fid-stats jobs write and read back: PNGs, webdataset tars, npz files, a unit's
statistics file (and the exact merge of them), the ADM sample batch ``samples_NxHxWx3.npz`` and ADM
reference batches read by ranged reads.

Every writer is deterministic (fixed tar mtime / owner, a fixed zlib level, np.savez key order), so
the same unit gives the same bytes on any worker.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import io
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

import enat
from pipeline import storage
from pipeline.commits import sha256
from pipeline.ranged import read_npy_header


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [0, 1] → uint8 [B, H, W, 3] as torchvision's save_image rounds (x·255 + 0.5,
    clamped, truncated — U-ViT's sample2dir / DiT's sample_ddp write PNGs this way)."""
    return images.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def png_bytes(image: np.ndarray, compress_level: int = 1) -> bytes:
    """uint8 (H, W, 3) → PNG bytes (lossless; deterministic for a given zlib)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG", compress_level=compress_level)
    return buf.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """np.savez of ``arrays`` in the given key order (uncompressed)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def tar_bytes(entries: Iterable[dict[str, Any]]) -> bytes:
    """webdataset entries → reproducible tar bytes (mtime 0, fixed owner)."""
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0, user="enat", group="enat") as tw:
        for e in entries:
            tw.write(e)
    return buf.getvalue()


def sample_key(index: int) -> str:
    """webdataset key of global sample ``index`` (no dots)."""
    return f"{index:07d}"


# ----------------------------------------------------------------------------------------------------
# A unit's statistics file and the exact merge


def stats_npz_bytes(feats: enat.FeatureStats, is_stats: Optional[enat.ISStats]) -> bytes:
    """A unit's statistics file: FeatureStats keys n / sum / outer, ISStats keys is_* (float64)."""
    sd = {k: v.numpy() for k, v in feats.state_dict().items()}
    if is_stats is not None:
        sd.update({f"is_{k}": v.numpy() for k, v in is_stats.state_dict().items()})
    return npz_bytes(**sd)


def stats_from_npz(data: bytes) -> tuple[enat.FeatureStats, Optional[enat.ISStats]]:
    """Inverse of :func:`stats_npz_bytes`."""
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        sd = {k: f[k] for k in f.files}
    feats = enat.FeatureStats.from_state_dict({k: sd[k] for k in ("n", "sum", "outer")})
    is_sd = {k[3:]: sd[k] for k in sd if k.startswith("is_")}
    return feats, enat.ISStats.from_state_dict(is_sd) if is_sd else None


def merge_stats(partials: Iterable[tuple[enat.FeatureStats, Optional[enat.ISStats]]]
                ) -> tuple[Optional[enat.FeatureStats], Optional[enat.ISStats]]:
    """``FeatureStats.merge`` / ``ISStats.merge`` of the unit statistics in the given order (exact:
    elementwise float64 sums; a fixed order makes the result bitwise reproducible). (None, None) for none."""
    feats = is_stats = None
    for f, s in partials:
        feats = f if feats is None else feats.merge(f)
        if s is not None:
            is_stats = s if is_stats is None else is_stats.merge(s)
    return feats, is_stats


def prefetch(fs: Any, paths: Sequence[str], window: int = 4,
             read: Optional[Callable[[str], Any]] = None) -> Iterator[tuple[str, Any]]:
    """``read(path)`` (default: the bytes) of ``paths`` in order, up to ``window`` reads in flight
    (bounded memory; reads and hashing overlap across threads)."""
    read = read or fs.cat_file
    with cf.ThreadPoolExecutor(window) as ex:
        pending: collections.deque = collections.deque()
        it = iter(paths)
        for p in it:
            pending.append((p, ex.submit(read, p)))
            if len(pending) >= window:
                break
        while pending:
            p, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, ex.submit(read, nxt)))
            yield p, fut.result()


def read_unit_stats(fs: Any, out: str, records: Sequence[dict]
                    ) -> Iterator[tuple[enat.FeatureStats, Optional[enat.ISStats]]]:
    """The statistics of ``records`` in order, each checked against its recorded sha256."""
    def read(p: str) -> tuple[bytes, str]:
        data = fs.cat_file(p)
        return data, sha256(data)  # hashlib releases the GIL: the reader threads hash in parallel

    paths = [f"{out}/stats/{r['unit']:06d}.npz" for r in records]
    for rec, (p, (data, sha)) in zip(records, prefetch(fs, paths, read=read)):
        want = rec["files"][f"stats/{rec['unit']:06d}.npz"]["sha256"]
        if sha != want:
            raise ValueError(f"{storage.redact(storage.to_url(fs, p))}: sha256 differs from its commit record "
                             f"(overwritten by another job?); delete the unit's _parts record and rerun")
        yield stats_from_npz(data)


def read_grid(fs: Any, out: str, indices: Sequence[int]) -> Optional[np.ndarray]:
    """uint8 [n, H, W, 3]: the grid samples ``grid/{index}.png``; None for no index."""
    from PIL import Image

    paths = [f"{out}/grid/{sample_key(i)}.png" for i in indices]
    if not paths:
        return None
    return np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for _, data in prefetch(fs, paths)])


# ----------------------------------------------------------------------------------------------------
# ADM npz: the sample batch written for ADM's evaluator, and reference batches read as image sources


class _Unseekable(io.RawIOBase):
    """Write-only wrapper with tell() but no seek: zipfile then streams (data descriptors, no rewinds),
    which object-store writers need."""

    def __init__(self, f: Any) -> None:
        self.f, self.pos = f, 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = self.f.write(b)
        n = len(b) if n is None else n
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return False

    def seek(self, *a: Any) -> int:
        raise OSError("not seekable")

    def flush(self) -> None:
        self.f.flush()


def write_adm_npz(fs: Any, out: str, records: Sequence[dict], num_samples: int) -> str:
    """Concatenate the units' npz files into one ``samples_{N}x{H}x{W}x3.npz`` (arr_0 uint8 NHWC, arr_1
    labels), streamed (the 50K × 256² file is 9.8 GB); returns its path."""
    h, w = records[0]["resolution"]
    path = f"{out}/samples_{num_samples}x{h}x{w}x3.npz"
    labels = []
    with storage.open_atomic(fs, path) as raw:
        with zipfile.ZipFile(_Unseekable(raw), "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(
                    f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                        "shape": (num_samples, h, w, 3)})
                for rec, (_, data) in zip(records, prefetch(fs, [f"{out}/npz/{r['unit']:06d}.npz"
                                                                  for r in records], window=2)):
                    with np.load(io.BytesIO(data), allow_pickle=False) as z:
                        arr = z["arr_0"]
                        labels.append(z["arr_1"])
                    if arr.shape != (rec["count"], h, w, 3) or arr.dtype != np.uint8:
                        raise ValueError(f"npz/{rec['unit']:06d}.npz: arr_0 {arr.dtype} {arr.shape}, expected "
                                         f"uint8 {(rec['count'], h, w, 3)}")
                    f.write(np.ascontiguousarray(arr).tobytes())
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.concatenate(labels))
            zf.writestr("arr_1.npy", buf.getvalue())
    return path


@dataclass(frozen=True)
class AdmNpzLayout:
    """Where the images of an ADM npz lie: `count` images of `shape` (H, W, 3) uint8; `offset`: the
    byte offset of their data in the file when `arr_0.npy` is stored uncompressed (np.savez), else None
    (np.savez_compressed: read through the zip member)."""

    count: int
    shape: tuple[int, int, int]
    data_start: int  # offset of the pixel data inside the arr_0.npy member (after the .npy header)
    offset: Optional[int]


def adm_npz_layout(fs: Any, path: str, name: str, resolution: int) -> AdmNpzLayout:
    """Read and check the layout of an ADM npz (reads the zip directory and the .npy header only, never
    the pixels). Raises ``FileNotFoundError`` / ``ValueError`` naming the file and the fix: a
    statistics-only npz (mu / sigma, no arr_0), arr_0 not uint8 [N, H, W, 3], or H, W != resolution."""
    shown = storage.redact(name)
    storage.invalidate(fs, path)
    if not storage.exists(fs, path):
        raise FileNotFoundError(f"source.root {shown}: does not exist")
    with fs.open(path, "rb") as f:
        try:
            zf = zipfile.ZipFile(f)
        except zipfile.BadZipFile:
            raise ValueError(f"source.root {shown}: not an .npz (zip) file; source.kind=adm_npz reads ADM's "
                             f"reference batches (arr_0: uint8 [N, H, W, 3])") from None
        with zf:
            keys = sorted(n[:-4] if n.endswith(".npy") else n for n in zf.namelist())
            if "arr_0.npy" not in zf.namelist():
                hint = (" — it holds statistics only; as pytorch-fid statistics (U-ViT's fid_stats, our fid-stats "
                        "job) use it as fid.reference, but ADM's mu / sigma are TF-Inception statistics that only "
                        "ADM's evaluator matches (docs/evaluation.md)") if {"mu", "sigma"} & set(keys) else ""
                raise ValueError(f"source.root {shown}: no images (arr_0) in the npz, keys {keys}{hint}")
            info = zf.getinfo("arr_0.npy")
            with zf.open(info) as m:
                shape, fortran, dtype = read_npy_header(m)
                data_start = m.tell()
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
            raise ValueError(f"source.root {shown}: arr_0 is {dtype} {tuple(shape)}"
                             f"{' (Fortran order)' if fortran else ''}; an ADM batch holds uint8 [N, H, W, 3] "
                             f"images (NHWC, RGB)")
        if shape[0] == 0:
            raise FileNotFoundError(f"source.root {shown}: arr_0 holds no image")
        if (shape[1], shape[2]) != (resolution, resolution):
            raise ValueError(f"source.root {shown}: arr_0 holds {shape[1]}x{shape[2]} images, source.resolution "
                             f"is {resolution}; set source.resolution={shape[1]} (the images are used as stored)"
                             if shape[1] == shape[2] else
                             f"source.root {shown}: arr_0 holds non-square {shape[1]}x{shape[2]} images; ADM "
                             f"batches are square center crops")
        offset = None
        if info.compress_type == zipfile.ZIP_STORED:
            f.seek(info.header_offset)
            local = f.read(30)  # zip local file header: name / extra lengths at bytes 26..30
            name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            offset = info.header_offset + 30 + name_len + extra_len + data_start
    return AdmNpzLayout(int(shape[0]), (int(shape[1]), int(shape[2]), 3), data_start, offset)


def read_adm_npz_rows(url: str, start: int, stop: int, resolution: int,
                      storage_cfg: storage.StorageLike = None) -> np.ndarray:
    """uint8 [stop - start, H, W, 3]: images [start, stop) of an ADM npz's arr_0 — one ranged read for an
    uncompressed member (a 10k-image batch is never read whole), a forward read through a compressed one."""
    fs, path = storage.filesystem(url, storage_cfg)
    lay = adm_npz_layout(fs, path, url, resolution)
    if not 0 <= start <= stop <= lay.count:
        raise ValueError(f"{storage.redact(url)}: rows [{start}, {stop}) outside arr_0's {lay.count} images")
    row = int(np.prod(lay.shape))
    with fs.open(path, "rb") as f:
        if lay.offset is not None:
            f.seek(lay.offset + start * row)
            data = f.read((stop - start) * row)
        else:
            with zipfile.ZipFile(f) as zf, zf.open("arr_0.npy") as m:
                m.seek(lay.data_start + start * row)
                data = m.read((stop - start) * row)
    if len(data) != (stop - start) * row:
        raise ValueError(f"{storage.redact(url)}: arr_0 is cut short ({len(data)} of {(stop - start) * row} bytes "
                         f"for rows [{start}, {stop})); the file is truncated — download it again")
    return np.frombuffer(data, dtype=np.uint8).reshape(stop - start, *lay.shape)
