"""Frozen-dataclass configs and one generic loader for every job.

A job's YAML file is nothing but a serialized config dataclass. :func:`load_config` builds any
(nested) frozen dataclass from a YAML path or a dict plus ``section.field=value`` overrides, and
rejects unknown or ill-typed fields before any work starts, naming the field::

    cfg = load_config(TokenizeJobConfig, "tokenize.yaml", ["tokenize.batch_size=64"])

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Optional[X]``, ``Literal[...]``,
``tuple[X, ...]``, ``list[X]``, ``dict[str, X]`` and nested dataclasses.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config field is unknown, missing, ill-typed or out of range; the message names the field."""


# ---------------------------------------------------------------------------------------------------
# Generic loader


def load_config(cls: type[T], source: Union[str, os.PathLike, Mapping[str, Any], None] = None,
                overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` (a dataclass) from a YAML path / mapping / None plus ``a.b=value`` overrides.

    Override values are parsed as YAML scalars/lists (``64``, ``null``, ``[train, val]``); a leading
    ``--`` is accepted (``--tokenize.batch_size=64``). Raises :class:`ConfigError` naming the field
    for unknown fields, missing required fields, wrong types and failed ``__post_init__`` checks.
    """
    if source is None:
        data: dict = {}
    elif isinstance(source, Mapping):
        data = _deepcopy_mapping(source)
    else:
        with open(os.fspath(source), encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{os.fspath(source)}: expected a mapping at the top level, got "
                              f"{type(loaded).__name__}")
        data = _deepcopy_mapping(loaded)
    for item in overrides:
        _apply_override(cls, data, item)
    return _build(cls, data, prefix="")


def config_to_dict(cfg: Any) -> Any:
    """Dataclass → plain JSON/YAML-friendly structure (tuples become lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {str(k): config_to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_config(cfg: Any) -> str:
    """Dataclass → YAML text that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def _deepcopy_mapping(m: Mapping) -> dict:
    return {k: _deepcopy_mapping(v) if isinstance(v, Mapping) else v for k, v in m.items()}


def _apply_override(cls: type, data: dict, item: str) -> None:
    text = item[2:] if item.startswith("--") else item
    if "=" not in text:
        raise ConfigError(f"override {item!r}: expected section.field=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    # Walk the dataclass types so the value can be parsed for the field's type.
    target_cls: Any = cls
    node = data
    for i, name in enumerate(parts):
        where = ".".join(parts[:i + 1])
        fields = {f.name: f for f in dataclasses.fields(target_cls)}
        if name not in fields:
            raise ConfigError(f"{where}: unknown field (override {item!r}); known fields of "
                              f"{'.'.join(parts[:i]) or target_cls.__name__}: {sorted(fields)}")
        ftype = _hints(target_cls)[name]
        if i == len(parts) - 1:
            node[name] = _parse_override_value(raw, ftype)
        else:
            inner = _strip_optional(ftype)
            if not (isinstance(inner, type) and dataclasses.is_dataclass(inner)):
                raise ConfigError(f"{where}: is not a section (override {item!r})")
            child = node.get(name)
            if not isinstance(child, dict):
                child = {}
                node[name] = child
            node, target_cls = child, inner


def _parse_override_value(raw: str, ftype: Any) -> Any:
    inner = _strip_optional(ftype)
    if inner is str and raw.strip() not in ("null", "~"):
        return raw  # a str field keeps the text verbatim ("007" stays "007")
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


_HINT_CACHE: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINT_CACHE:
        _HINT_CACHE[cls] = typing.get_type_hints(cls)
    return _HINT_CACHE[cls]


def _strip_optional(tp: Any) -> Any:
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping for {cls.__name__}, "
                          f"got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{prefix}{u}" for u in unknown)
        raise ConfigError(f"{names}: unknown field(s); known fields of {prefix.rstrip('.') or cls.__name__}: "
                          f"{sorted(fields)}")
    hints = _hints(cls)
    kwargs = {}
    for name, f in fields.items():
        where = f"{prefix}{name}"
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: required field is missing")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def _convert(value: Any, tp: Any, where: str) -> Any:
    if tp is Any:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{where}: {value!r} matches none of {tp}")
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: must be one of {list(allowed)}, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _build(tp, value if value is not None else {}, prefix=f"{where}.")
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = [_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            elem = args[0] if args else Any
            items = [_convert(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        kt, vt = (typing.get_args(tp) + (Any, Any))[:2]
        return {_convert(k, kt, f"{where}.<key>"): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected a bool, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


# ---------------------------------------------------------------------------------------------------
# Locations: fields holding a path or URL, resolved once on the driver

LOCATION = "enat.location"  # dataclass field metadata key marking a path/URL field


def location(default: Any = "", *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field that holds a path or URL (``field(metadata={LOCATION: True})``).

    :func:`resolve_locations` makes every such field absolute on the driver, so Ray workers whose
    working directory differs (Ray Train workers, the nodes of a cluster) read the same files.
    Values may be a string, a tuple/list of strings or a dict of strings (each resolved).
    """
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata={LOCATION: True})
    return field(default=default, metadata={LOCATION: True})


def absolute_location(value: str, cwd: Optional[str] = None) -> str:
    """A relative local path → an absolute one (against ``cwd``, default the process's); ``~`` expanded.

    ``file:`` URLs keep their scheme (``file://rel/x`` and ``file:rel/x`` become ``file:///<cwd>/rel/x``);
    ``sqlite:///rel.db`` (an MLflow store) becomes ``sqlite:////<cwd>/rel.db``; other URLs (``s3://``,
    ``gs://``, ``http://``, ``memory://`` …) and empty values are returned unchanged.
    """
    if not value:
        return value
    cwd = cwd or os.getcwd()

    def absolute(path: str) -> str:
        return os.path.normpath(os.path.join(cwd, os.path.expanduser(path)))

    low = value.lower()
    if low.startswith("sqlite:///"):
        return "sqlite:///" + absolute(value[len("sqlite:///"):])
    if low.startswith("file://"):
        return "file://" + absolute(value[len("file://"):])
    if low.startswith("file:"):
        return "file://" + absolute(value[len("file:"):])
    if "://" in value:
        return value
    return absolute(value)


def resolve_locations(cfg: T, cwd: Optional[str] = None) -> T:
    """``cfg`` with every :func:`location` field (in nested dataclasses too) made absolute.

    Called where a job's config is built on the driver (:func:`parse_job_args`), before anything is
    checked or handed to Ray; idempotent, so resolving an already resolved config changes nothing.
    """
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        return cfg
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get(LOCATION):
            new = _resolve_value(value, cwd)
        else:
            new = resolve_locations(value, cwd)
        if new is not value and new != value:
            changes[f.name] = new
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _resolve_value(value: Any, cwd: Optional[str]) -> Any:
    if isinstance(value, str):
        return absolute_location(value, cwd)
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve_value(v, cwd) for v in value)
    if isinstance(value, Mapping):
        return {k: _resolve_value(v, cwd) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------------
# Tokenize job config


@dataclass(frozen=True)
class StorageConfig:
    """How to reach object storage. Credentials come only from the standard AWS environment/config
    files (or the named ``profile``), never from here, so this config can be logged and recorded."""

    endpoint_url: Optional[str] = None  # S3-compatible endpoint (MinIO, moto, R2…); None: AWS_ENDPOINT_URL or AWS
    region: Optional[str] = None  # None: AWS_DEFAULT_REGION / ~/.aws/config
    profile: Optional[str] = None  # a named profile of ~/.aws/credentials
    anon: bool = False  # unsigned requests (public buckets)
    # extra fsspec options per protocol, e.g. {"s3": {"requester_pays": true}}; no secrets here
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # see the comment above

    def __post_init__(self) -> None:
        for proto, opts in self.options.items():
            bad = [k for k in opts if any(s in k.lower() for s in ("secret", "key", "token", "password"))]
            if bad:
                raise ValueError(f"options.{proto}.{bad[0]}: credentials may not be put in the config; "
                                 f"use the AWS environment, ~/.aws/credentials or storage.profile")


@dataclass(frozen=True)
class SourceConfig:
    """Where the images come from."""

    kind: Literal["imagefolder", "coco"] = "imagefolder"  # dataset layout (see below)
    # imagefolder: root holding <split>/<class>/<image> (ImageNet layout), local path or URL.
    # coco: root holding annotations/captions_<split>.json and <split>/<image>.
    root: str = location("")  # dataset root, local path or URL (required)
    splits: tuple[str, ...] = ("train",)  # split folders to tokenize, e.g. [train, val] or [train2014]
    # as official: dataset.py _list_image_files_recursively keeps only these extensions
    extensions: tuple[str, ...] = ("jpg", "jpeg", "png", "gif")  # other files are recorded as rejects
    limit: Optional[int] = None  # keep only the first N images of each split (smoke runs)
    # imagefolder: a split whose images lie directly in its folder (ImageNet val as distributed:
    # val/ILSVRC2012_val_00000001.JPEG …) takes its labels from a file, per split: the Kaggle
    # LOC_val_solution.csv (ImageId,PredictionString: the first token is the wnid) or the devkit's
    # ILSVRC2012_validation_ground_truth.txt (one 1-based ILSVRC2012_ID per line; needs `synsets`).
    # Paths without a scheme that do not start with "/" are relative to root.
    labels: dict[str, str] = field(default_factory=dict)  # split → label file of a flat split (see above)
    # the devkit's synset list in ILSVRC2012_ID order (NOT the sorted-wnid order of the labels):
    # ILSVRC2012_devkit_t12/data/meta.mat, or a text file with one wnid per line in that order;
    # relative to root like `labels` (so not a driver-resolved location)
    synsets: Optional[str] = None  # needed by a ground_truth.txt label file (see above)
    # center crop: adm = ADM's BOX-halving + BICUBIC crop (official ENAT / ImageNet); uvit = U-ViT's
    # crop to the short side + Lanczos resize (the pipeline of fid_stats_mscoco256_val.npz); auto:
    # uvit for kind=coco, adm otherwise
    crop: Literal["auto", "adm", "uvit"] = "auto"  # see above

    def __post_init__(self) -> None:
        if not self.splits:
            raise ValueError("splits: at least one split is required")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit: must be ≥ 1 or null, got {self.limit}")
        unknown = sorted(set(self.labels) - set(self.splits))
        if unknown:
            raise ValueError(f"labels.{unknown[0]}: not one of splits {list(self.splits)}")
        if self.labels and self.kind != "imagefolder":
            raise ValueError("labels: label files apply to kind=imagefolder only")


@dataclass(frozen=True)
class ImageConfig:
    """Decode and preprocessing."""

    resolution: int = 256  # the official center crop's output size (256 or 512 in the paper)
    min_side: int = 8  # images whose short side is smaller are rejected as "tiny"
    # larger images are rejected as "decompression-bomb"; default = PIL's own error threshold
    max_pixels: int = 2 * 89_478_485  # more pixels (read from the header) → "decompression-bomb"

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise ValueError(f"resolution: must be positive, got {self.resolution}")
        if self.min_side < 1 or self.max_pixels < 1:
            raise ValueError("min_side and max_pixels must be positive")


@dataclass(frozen=True)
class TokenizerConfig:
    """The VQ tokenizer run on the encode actors."""

    kind: Literal["vqgan", "patch"] = "vqgan"  # enat.vqgan.VQGAN (the paper's) or enat.patch_vq.PatchVQ (tests)
    # weights URL/path: VQGAN official checkpoint (vqgan_jax_strongaug.ckpt) or a PatchVQ state dict.
    # null with kind=vqgan builds random weights (benchmarks only; recorded in dataset.json).
    weights: Optional[str] = location(None)  # URL/path of the weights (see above)
    preset: str = "mage-f16"  # VQGAN config preset (enat-facts §8)
    seed: int = 0  # random-weights seed (weights: null)


@dataclass(frozen=True)
class TextConfig:
    """Text encoder for caption datasets (COCO); ignored for imagefolder sources."""

    kind: Literal["clip", "random"] = "clip"  # clip: CLIP ViT-L/14 text tower; random: offline stand-in
    # clip: a local directory / URL with a transformers CLIPTextModel + CLIPTokenizer
    # (openai/clip-vit-large-patch14, as U-ViT's FrozenCLIPEmbedder; enat-facts §10)
    weights: Optional[str] = location(None)  # clip only (see above)
    length: int = 77  # tokens per caption (CLIP's context length)
    dim: int = 64  # random encoder width (clip: taken from the model, 768 for ViT-L/14)
    seed: int = 0  # random encoder weights
    batch_size: int = 64  # captions per forward


@dataclass(frozen=True)
class TokenizeConfig:
    """The tokenize graph and its output."""

    out: str = location("")  # output root URL: {out}/{split}/{split}-000000.tar, manifest.parquet, dataset.json
    samples_per_shard: int = 1000  # images per shard (a shard is the unit of work); ~128 for COCO
    rows_per_entry: int = 1000  # token rows packed into one tar entry (512 B per row at 256 px)
    text_rows_per_entry: int = 8  # images per tar entry when text features are stored (~0.6 MB each)
    batch_size: int = 128  # images per encoder forward (the official script uses 128)
    flips: Literal["train", "all", "none"] = "train"  # store flipped tokens: splits named train*, all, none
    encode_actors: int = 1  # encoder actor pool size (one per GPU on a cluster)
    actor_num_gpus: float = 0.0  # GPUs per encoder actor (1 on a GPU cluster)
    actor_num_cpus: float = 1.0  # CPUs per encoder actor (its torch threads on CPU)
    decode_num_cpus: float = 1.0  # CPUs per decode task
    # where decode + crop runs: "tasks" (a CPU task pool feeding the encoder actors: GPU clusters),
    # "actors" (each encoder actor decodes its own shard: CPU-only encoding, no transfer between
    # processes), "auto" (actors when actor_num_gpus == 0, else tasks)
    decode_on: Literal["auto", "tasks", "actors"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the actor has a GPU
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # encoder autocast on cuda (fp32 = official)
    overwrite: bool = False  # redo shards already committed with a different plan/tokenizer
    throttle_s: float = 0.0  # sleep after each shard (fault-injection tests and demos only)
    progress: bool = True  # tqdm bar on the driver

    def __post_init__(self) -> None:
        for name in ("samples_per_shard", "rows_per_entry", "text_rows_per_entry", "batch_size", "encode_actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be ≥ 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class RayConfig:
    """How the job reaches Ray. Under ``ray job submit`` RAY_ADDRESS is set and these are ignored."""

    address: Optional[str] = None  # None: RAY_ADDRESS, else start an embedded local Ray on 127.0.0.1
    num_cpus: Optional[int] = None  # embedded Ray only
    num_gpus: Optional[int] = None  # embedded Ray only
    object_store_memory: Optional[int] = None  # bytes, embedded Ray only


@dataclass(frozen=True)
class TokenizeJobConfig:
    """``python -m jobs.tokenize --config tokenize.yaml``: everything the job needs."""

    source: SourceConfig = field(default_factory=SourceConfig)  # what to read
    image: ImageConfig = field(default_factory=ImageConfig)  # decode + center crop
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # the VQ encoder
    text: TextConfig = field(default_factory=TextConfig)  # caption encoder (coco only)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)  # the graph and its output
    storage: StorageConfig = field(default_factory=StorageConfig)  # object-store settings
    ray: RayConfig = field(default_factory=RayConfig)  # how to reach Ray

    def __post_init__(self) -> None:
        if not self.source.root:
            raise ConfigError("source.root: required (local path or URL of the image data)")
        if not self.tokenize.out:
            raise ConfigError("tokenize.out: required (output URL)")


# Named presets (paper numbers: enat-facts §5, §8, §10). Paths are placeholders to override.
TOKENIZE_PRESETS: dict[str, dict[str, Any]] = {
    # ImageNet-1k 256 px: 1,281,167 train images → 2 token rows each (plain + flip), MAGE VQGAN f16.
    "imagenet-256": {"source": {"kind": "imagefolder", "splits": ["train", "val"]},
                     "image": {"resolution": 256},
                     "tokenizer": {"kind": "vqgan", "preset": "mage-f16"},
                     "tokenize": {"samples_per_shard": 1000, "batch_size": 128}},
    "imagenet-512": {"source": {"kind": "imagefolder", "splits": ["train", "val"]},
                     "image": {"resolution": 512},
                     "tokenizer": {"kind": "vqgan", "preset": "mage-f16"},
                     "tokenize": {"samples_per_shard": 500, "batch_size": 64}},
    # MS-COCO 2014 256 px with CLIP ViT-L/14 text features (U-ViT recipe; enat-facts §10).
    "coco-256": {"source": {"kind": "coco", "splits": ["train2014", "val2014"]},
                 "image": {"resolution": 256},
                 "tokenizer": {"kind": "vqgan", "preset": "mage-f16"},
                 "text": {"kind": "clip", "length": 77},
                 "tokenize": {"samples_per_shard": 128, "batch_size": 128}},
}


def merge_dicts(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict:
    """Recursive dict merge: ``over`` wins; nested mappings are merged, other values replaced."""
    out = _deepcopy_mapping(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = _deepcopy_mapping(v) if isinstance(v, Mapping) else v
    return out


@dataclass(frozen=True)
class ReaderConfig:
    """Training-time token reader (pipeline.readers.make_reader); one per rank."""

    kind: Literal["memory", "stream"] = "memory"  # memory: whole split in RAM (ImageNet); stream: webdataset
    root: str = location("")  # dataset root URL written by the tokenize job (holds dataset.json)
    split: str = "train"  # split folder under root
    batch_size: int = 64  # per rank
    seed: int = 0  # permutation / flip / caption / drop draws derive from (seed, epoch[, rank, worker])
    flip: Literal["random", "none", "both"] = "random"  # both = plain and flipped rows every epoch (official)
    caption: Literal["random", "first"] = "random"  # which caption of an image (caption datasets)
    p_uncond: float = 0.0  # label → num_classes / caption → empty caption with this probability (0.15 official)
    drop_last: bool = True  # memory: False pads the last global batch by wrapping around
    num_workers: int = 2  # stream: DataLoader workers per rank
    shuffle_buffer: int = 1000  # stream: sample shuffle buffer per worker (0: no sample shuffling)
    shuffle_shards: bool = True  # stream: shuffle the shard order every epoch
    resampled: bool = False  # stream: draw shards with replacement forever (set batches_per_epoch)
    batches_per_epoch: Optional[int] = None  # stream: nominal epoch length in batches
    verify: bool = True  # memory: check every shard's sha256 against the manifest

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond: must lie in [0, 1), got {self.p_uncond}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be ≥ 1, got {self.batch_size}")
        if self.resampled and not self.batches_per_epoch:
            raise ValueError("batches_per_epoch: required with resampled=true (the stream is infinite)")


def parse_job_args(cls: type[T], argv: Optional[Sequence[str]], prog: str, description: str,
                   presets: Optional[Mapping[str, Mapping[str, Any]]] = None) -> T:
    """The command line every job shares: ``[--preset NAME] [--config x.yaml] [section.field=value ...]``.

    The preset is the base, the YAML file is merged over it, the overrides are applied last; the result
    is validated by :func:`load_config` (errors name the field) before any work starts.
    """
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=description,
                                epilog="Every field of the config can be overridden as section.field=value.")
    p.add_argument("--config", help=f"YAML file holding a {cls.__name__}")
    if presets:
        p.add_argument("--preset", choices=sorted(presets), help="start from a named preset")
    p.add_argument("overrides", nargs="*", help="section.field=value (a leading -- is accepted)")
    args, extra = p.parse_known_args(argv)
    unknown = [a for a in extra if not (a.startswith("--") and "=" in a)]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    base: dict[str, Any] = dict(presets[args.preset]) if presets and args.preset else {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{args.config}: expected a mapping at the top level, got {type(loaded).__name__}")
        base = merge_dicts(base, loaded)
    # relative paths are resolved here, on the driver: workers may run in another directory
    return resolve_locations(load_config(cls, base, list(args.overrides) + extra))
