"""Import the official ENAT code (LeapLabTHU/ENAT) from a checkout the user fetched themselves.

The official code is never copied into this project. Its vendored `timm` pulls in torchvision through
`timm.data` (for two constants) and every model file through `timm/__init__`; torchvision's compiled ops
do not load with a CPU-only torch, so we register the `timm` packages without running their
`__init__` files and give `timm.data` the two constants it is imported for. Nothing inside the
official modules we use is changed.
"""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path


def load_official(path: str | Path):
    """-> namespace with `models` (libs.models), `nat_misc` (libs.nat_misc) and `root`."""
    root = Path(path).resolve()
    if not (root / "libs" / "models.py").exists():
        raise FileNotFoundError(f"{root}: not a checkout of LeapLabTHU/ENAT (libs/models.py missing)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    for name, sub in (("timm", "timm"), ("timm.models", "timm/models")):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(root / sub)]
            sys.modules[name] = pkg
    if "timm.data" not in sys.modules:
        data = types.ModuleType("timm.data")
        data.IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
        data.IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
        sys.modules["timm.data"] = data
    ns = types.SimpleNamespace(root=root)
    ns.models = importlib.import_module("libs.models")
    ns.nat_misc = importlib.import_module("libs.nat_misc")
    return ns


def official_args(encoder_depth: int, decoder_depth: int, dim: int, num_heads: int, seq_len: int = 256,
                  cfg_scale: float = 2.5, mask_temp: float = 1.5, samp_temp: float = 6.0):
    """The argparse namespace the official DiT / NATSchedule read their settings from."""
    return types.SimpleNamespace(enc_dec=[encoder_depth, decoder_depth], embed_dim=dim, num_heads=num_heads,
                                 seq_len=seq_len, latent_size=int(seq_len ** 0.5), cfg_scale=cfg_scale,
                                 mask_temp=mask_temp, samp_temp=samp_temp)


def set_allocator(mode: str, ours: bool) -> None:
    """glibc malloc for the call about to run, process-wide: ``deployed`` = ours as our CPU workers run it
    (freed memory kept, pipeline.cluster.keep_freed_memory), the official code as its scripts run it
    (glibc's defaults, pipeline.cluster.default_freed_memory); ``kept`` / ``default`` = both alike."""
    from pipeline.cluster import default_freed_memory, keep_freed_memory

    if mode == "kept" or (mode == "deployed" and ours):
        keep_freed_memory()
    else:
        default_freed_memory()
