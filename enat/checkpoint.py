"""Loading weights from a state dict, a local path or an open binary file.

`enat/` never opens object-store URIs itself: the pipeline's storage layer opens them and hands the
open file in. Nothing here downloads anything.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import BinaryIO, Mapping, Union

import torch
from torch import nn

Source = Union[Mapping[str, torch.Tensor], str, os.PathLike, BinaryIO, bytes]

# Official / common wrapper keys a released checkpoint may hold its weights under.
_WRAPPER_KEYS = ("state_dict", "model", "module", "nnet_ema", "nnet", "ema", "model_ema")


def read_state_dict(source: Source) -> dict[str, torch.Tensor]:
    """Return a flat ``{name: tensor}`` dict from a state dict, a path, bytes or an open binary file.

    Unwraps a wrapper key (``state_dict``, ``model``, ...) and strips a DDP ``module.`` prefix.
    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for something that is not a
    state dict.
    """
    name = "<state dict>"
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if not os.path.exists(name):
            raise FileNotFoundError(f"checkpoint {name!r} does not exist")
        obj = _load_weights(name, name)
    elif isinstance(source, (bytes, bytearray)):
        obj = _load_weights(io.BytesIO(source), name)
    elif hasattr(source, "read"):
        name = getattr(source, "name", "<open file>")
        obj = _load_weights(source, name)
    else:
        obj = source
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {name}: expected a state dict (a mapping of names to tensors), "
                         f"got {type(obj).__name__}")
    # Unwrap {"model": {...}} / {"state_dict": {...}} style containers.
    for _ in range(3):
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError(f"checkpoint {name}: no tensors found (top-level keys: {sorted(obj)[:10]})")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _load_weights(f, name: str):
    """``torch.load`` with ``weights_only=True``: tensors, containers and plain values only, so a tampered
    file cannot run code on load. The released checkpoints (ENAT's ``nnet_ema.pth``, MAGE's VQGAN
    ``{"state_dict": …}``, pytorch-fid's Inception) are such files; one that needs pickle is refused,
    naming the file and what it asked for."""
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {name}: refused, loading it would run pickled code ({first}); if you "
                         f"trust the file, load it yourself with pickle allowed (torch.load, weights_only off) and save its "
                         f"state dict") from None


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "checkpoint",
                ignore: tuple[str, ...] = ()) -> None:
    """``module.load_state_dict(strict=True)`` with one error that lists every missing key, unexpected
    key and shape mismatch (torch stops at shape mismatches without naming all of them)."""
    own = module.state_dict()
    sd = {k: v for k, v in state_dict.items() if not any(s in k for s in ignore)}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{what} does not match the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): " + "; ".join(shapes[:20]))
        lines.append("  check that the config (preset, resolution, codebook/classes) matches the checkpoint")
        raise ValueError("\n".join(lines))
    module.load_state_dict(sd, strict=True)
