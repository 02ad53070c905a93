"""The networks the jobs build from their configs: ENAT's architecture, the VQ tokenizer, the FID Inception.

One definition each, used by every job: the ``model`` section (an ENAT preset with overrides) and
:func:`model_config`; the ``tokenizer`` section and :func:`build_tokenizer` (with the identity recorded
in every output it touches); the ``inception`` section and :func:`build_inception`; and
:func:`decode_images`, the tokenizer's decoder under the configured precision.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

import enat
from pipeline import storage
from pipeline.commits import state_sha256
from pipeline.config import ConfigError, location
from pipeline.sections import Precision, torch_dtype


@dataclass(frozen=True)
class ModelSection:
    """ENAT's architecture: a preset (enat-facts §3) with optional overrides (tiny models for tests)."""

    preset: Optional[str] = None  # e.g. enat-l; sample: null reads config.json beside the checkpoint
    encoder_depth: Optional[int] = None  # blocks on the visible tokens
    decoder_depth: Optional[int] = None  # blocks on the [MASK] tokens
    dim: Optional[int] = None  # width
    num_heads: Optional[int] = None
    num_classes: Optional[int] = None  # 1000 for ImageNet; label num_classes is the null class
    codebook_size: Optional[int] = None  # must equal the tokenizer's (1024 for MAGE's VQGAN)
    seq_len: Optional[int] = None  # tokens per image (256 at 256 px, 1024 at 512 px)
    text_dim: Optional[int] = None  # text models: caption feature width (768 for CLIP ViT-L/14)
    text_len: Optional[int] = None  # text models: caption tokens (77)

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in enat.ENATConfig.presets():
            raise ValueError(f"preset: unknown ENAT preset {self.preset!r}; known: "
                             f"{', '.join(enat.ENATConfig.presets())}")

    def overrides(self) -> dict[str, int]:
        """The architecture fields that are set."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelSection)
                if f.name != "preset" and getattr(self, f.name) is not None}


def model_config(section: ModelSection, base: Optional[enat.ENATConfig] = None,
                 dataset: Optional[dict] = None) -> enat.ENATConfig:
    """The preset (else ``base``) with the section's overrides; with a token dataset's ``dataset.json``,
    sized to it (tokens per image, codebook, classes, caption features). Raises ``ConfigError``."""
    if section.preset:
        base = enat.ENATConfig.preset(section.preset)
    if base is None:
        raise ConfigError("model.preset: required (an ENAT preset such as enat-l)")
    over = section.overrides()
    if dataset is not None:
        sized = {"seq_len": int(dataset["seq_len"]), "codebook_size": int(dataset["codebook_size"])}
        if dataset.get("num_classes"):
            sized["num_classes"] = int(dataset["num_classes"])
        if dataset.get("text"):
            sized["text_dim"] = over.get("text_dim", int(dataset["text"]["dim"]))
            sized["text_len"] = int(dataset["text"].get("length", 77))
        for k, v in sized.items():
            if k in over and over[k] != v:
                raise ConfigError(f"model.{k}: {over[k]} does not match the token dataset's {v}; leave it unset")
        over.update(sized)
    try:
        return dataclasses.replace(base, **over)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None


@dataclass(frozen=True)
class TokenizerSection:
    """The VQ tokenizer: encodes in the tokenize job, decodes in the sample job and the training grid."""

    kind: Literal["vqgan", "patch"] = "vqgan"  # enat.vqgan.VQGAN (the paper's) or enat.patch_vq.PatchVQ (tests)
    # weights URL/path: VQGAN official checkpoint (vqgan_jax_strongaug.ckpt) or a PatchVQ state dict.
    # null with kind=vqgan builds random weights (benchmarks only; recorded in dataset.json).
    weights: Optional[str] = location(None)  # URL/path of the weights (see above)
    preset: str = "mage-f16"  # VQGAN config preset (enat-facts §8)
    seed: int = 0  # random-weights seed (weights: null)
    # autocast of the encoder (tokenize, CUDA only: fp32 = official; bf16 is faster, codes may differ at
    # near-ties) and of the decoder (sample: the official eval decodes under fp16)
    precision: Precision = "fp32"


def build_tokenizer(cfg: TokenizerSection, storage_cfg: storage.StorageLike = None) -> tuple[Any, dict[str, Any]]:
    """Build the VQ tokenizer (eval mode) and its identity ``{kind, class, preset, weights (redacted URL),
    weights_sha256, random, seed, codebook_size, downsample}``.

    ``weights_sha256`` is the sha256 of the weights file (or of the state dict for random weights).
    """
    data = storage.read_url(cfg.weights, storage_cfg, "tokenizer.weights") if cfg.weights else None
    if cfg.kind == "vqgan":
        from enat.vqgan import VQGAN

        if data is not None:
            tok = VQGAN.from_official(io.BytesIO(data), cfg.preset)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                tok = VQGAN(cfg.preset)
    elif cfg.kind == "patch":
        from enat.patch_vq import PatchVQ

        if data is None:
            raise ConfigError("tokenizer.weights: required for tokenizer.kind=patch (a PatchVQ state dict)")
        tok = PatchVQ.from_state_dict(io.BytesIO(data))
    else:
        raise ConfigError(f"tokenizer.kind: unknown tokenizer {cfg.kind!r}; known: vqgan, patch")
    if int(tok.codebook_size) > 65536:
        raise ConfigError(f"tokenizer: codebook_size {tok.codebook_size} does not fit uint16 token shards")
    tok.eval()
    identity = {"kind": cfg.kind, "class": f"{type(tok).__module__}.{type(tok).__qualname__}",
                "preset": cfg.preset if cfg.kind == "vqgan" else None,
                "weights": storage.redact(cfg.weights) if cfg.weights else None,
                "weights_sha256": hashlib.sha256(data).hexdigest() if data is not None else state_sha256(tok),
                "random": data is None, "seed": cfg.seed if data is None else None,
                "codebook_size": int(tok.codebook_size), "downsample": int(tok.downsample)}
    return tok, identity


def device_dtype(precision: str, device: torch.device, field: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``precision`` on ``device``; fp16 on a CPU without oneDNN fp16 kernels runs
    fp32 instead (None).

    There torch runs fp16 convolutions through its reference kernels, ~20x slower than fp32 (measured on
    the CI machine for the VQGAN decoder); the GPU configs ask for fp16 (the official eval decodes under
    fp16) and still run when a CPU worker picks them up.
    """
    dtype = torch_dtype(precision)
    if dtype == torch.float16 and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        print(f"{field}=fp16: this CPU has no fp16 kernels; running fp32 instead", flush=True)
        return None
    return dtype


def decode_images(tok: Any, codes: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """codes (B, h, w) → float32 images (B, 3, H, W) in [0, 1], the decoder under autocast(dtype)."""
    if dtype is None:
        return tok.decode(codes)
    if "dtype" in inspect.signature(tok.decode).parameters:  # VQGAN: its own autocast
        return tok.decode(codes, dtype=dtype)
    with torch.autocast(codes.device.type, dtype=dtype):  # e.g. PatchVQ
        return tok.decode(codes).float()


@dataclass(frozen=True)
class InceptionSection:
    """The FID Inception (pytorch-fid's network, enat.FIDInception)."""

    # pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (URL or path). null: no Inception, and FID /
    # IS are reported as unavailable; samples, grid and everything else are still produced.
    weights: Optional[str] = location(None)
    uint8: bool = False  # quantize to the uint8 grid first (ADM / PNG protocol); official ENAT: false
    precision: Precision = "fp32"  # autocast for the convolutions (fp32 = pytorch-fid's numbers)


def build_inception(section: InceptionSection, storage_cfg: storage.StorageLike = None,
                    device: Optional[torch.device] = None) -> tuple[Optional[Any], Optional[str]]:
    """(FIDInception loaded strictly from pytorch-fid's weights, their sha256), or (None, None) when
    ``section.weights`` is null (FID unavailable)."""
    if not section.weights:
        return None, None
    data = storage.read_url(section.weights, storage_cfg, "inception.weights")
    net = enat.FIDInception.from_pytorch_fid(io.BytesIO(data), uint8_protocol=section.uint8,
                                             autocast_dtype=torch_dtype(section.precision))
    return net.to(device or "cpu"), hashlib.sha256(data).hexdigest()
