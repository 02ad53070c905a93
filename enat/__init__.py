"""ENAT (EfficientNAT, NeurIPS 2024): the model library, pure PyTorch.

Nothing in this package imports Ray, DeepSpeed, MLflow, fsspec or webdataset.
"""
from .checkpoint import load_strict, read_state_dict
from .model import ENAT, ENATConfig, ENATOutput, ENATState
from .objective import ObjectiveConfig, ema_update, ema_update_tensors, lsimple, mask_tokens, warmup_constant
from .sampler import SamplerConfig, generate, mask_schedule

__version__ = "0.1.0"

_LAZY = {
    "VQGAN": "vqgan", "VQGANConfig": "vqgan", "center_crop_arr": "vqgan",
    "PatchVQ": "patch_vq",
    "FIDInception": "inception",
    "FeatureStats": "fid", "ISStats": "fid", "inception_score": "fid", "frechet_distance": "fid",
    "load_reference_stats": "fid", "is_protocol": "fid", "IS_SHUFFLE_SEED": "fid",
}


def __getattr__(name: str):
    # tokenizers, the FID network and its statistics are imported on first use (keeps `import enat` light)
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'enat' has no attribute {name!r}")
