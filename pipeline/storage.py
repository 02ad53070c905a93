"""Every path is a URL: one factory from URL to filesystem, atomic writes, cache-safe listings.

``file://``, plain paths, ``s3://``, ``gs://`` and ``memory://`` all go through fsspec. S3 settings
(endpoint, region, credentials) come from the standard AWS environment and config files; the job
config may override the endpoint/region/profile (:class:`pipeline.config.StorageConfig`) but never
carries credentials, so neither a config dump nor a log line can leak them.

Writes are atomic: readers see a complete object or nothing.

* object stores: one ``PUT`` (``fs.pipe``; s3fs stays single-PUT below 100 MiB) or a multipart
  upload completed only on success — an exception aborts it (``discard``) instead of committing
  the partial object, which is what s3fs's own ``with fs.open(p, "wb")`` does (ecosystem §8.1).
* local disk: write a temporary file beside the target, then ``os.replace`` (atomic rename).

webdataset has no ``s3://`` opener: :func:`register_wds_opener` installs one into
``webdataset.gopen_schemes`` (inherited by fork workers only) and :class:`ShardOpener` is a
picklable pipeline stage that works with spawn workers too (ecosystem §8.4).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import uuid
from typing import Any, BinaryIO, Iterable, Iterator, Mapping, Optional, Union

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.sections import StorageConfig

SINGLE_PUT_LIMIT = 100 * 2**20  # s3fs pipe() does one PUT below 2 × its 50 MiB chunk size
TMP_MARK = ".tmp-"  # temporary keys: "<dir>/.<name>.tmp-<hex>"; listings skip them

StorageLike = Union[StorageConfig, Mapping[str, Any], None]


def as_storage_config(storage: StorageLike) -> StorageConfig:
    """``StorageConfig`` | mapping | None → ``StorageConfig``."""
    if storage is None:
        return StorageConfig()
    if isinstance(storage, StorageConfig):
        return storage
    return StorageConfig(**dict(storage))


def protocol_of(url: str) -> str:
    """``"s3://b/k"`` → ``"s3"``; plain paths → ``"file"``."""
    url = os.fspath(url)
    if "://" in url:
        proto = url.split("://", 1)[0].lower()
        return {"s3a": "s3", "gcs": "gs", "local": "file"}.get(proto, proto)
    return "file"


def storage_options(protocol: str, storage: StorageLike = None) -> dict[str, Any]:
    """fsspec keyword arguments for ``protocol`` from the storage config (never credentials)."""
    cfg = as_storage_config(storage)
    opts: dict[str, Any] = {}
    if protocol == "s3":
        if cfg.endpoint_url:
            opts["endpoint_url"] = cfg.endpoint_url
        if cfg.region:
            opts.setdefault("client_kwargs", {})["region_name"] = cfg.region
        if cfg.profile:
            opts["profile"] = cfg.profile
        if cfg.anon:
            opts["anon"] = True
    elif protocol == "gs":
        if cfg.endpoint_url:
            opts["endpoint_url"] = cfg.endpoint_url
        if cfg.anon:
            opts["token"] = "anon"
    for k, v in cfg.options.get(protocol, {}).items():
        opts[k] = v
    return opts


def filesystem(url: str, storage: StorageLike = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """URL → ``(fs, path)`` where ``path`` is what ``fs`` methods take.

    S3: endpoint/region/profile from ``storage`` if given, else botocore's standard resolution
    (``AWS_ENDPOINT_URL[_S3]``, ``AWS_DEFAULT_REGION``, ``~/.aws/config``); credentials always from
    the environment/credential files. Instances are cached by fsspec (same options → same object).
    """
    url = os.fspath(url)
    proto = protocol_of(url)
    opts = storage_options(proto, storage)
    fs, path = fsspec.core.url_to_fs(url, **opts)
    return fs, path


def fs_protocol(fs: fsspec.AbstractFileSystem) -> str:
    """The filesystem's main protocol name ("s3", "file", "memory", …)."""
    proto = fs.protocol
    return proto if isinstance(proto, str) else proto[0]


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(url: str, *parts: str) -> str:
    """Join URL/path components with ``/`` (no normalisation of the scheme part)."""
    out = os.fspath(url).rstrip("/")
    for p in parts:
        p = p.strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """``(fs, path)`` → a URL that :func:`filesystem` maps back to the same object."""
    if is_local(fs):
        return path
    return fs.unstrip_protocol(path)


# ---------------------------------------------------------------------------------------------------
# Atomic writes


def _tmp_path(path: str) -> str:
    head, _, name = path.rpartition("/")
    return f"{head}/.{name}{TMP_MARK}{uuid.uuid4().hex[:12]}" if head else f".{name}{TMP_MARK}{uuid.uuid4().hex[:12]}"


def put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see all of it or nothing.

    Local: temp file + ``os.replace``. Object stores: one ``pipe`` (a single PUT below 100 MiB, a
    multipart upload that only becomes visible on completion above).
    """
    if is_local(fs):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = _tmp_path(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
    else:
        fs.pipe_file(path, bytes(data))
    invalidate(fs, path)


@contextlib.contextmanager
def open_atomic(fs: fsspec.AbstractFileSystem, path: str, block_size: int = 64 * 2**20) -> Iterator[BinaryIO]:
    """Context manager yielding a binary writer; the object is committed only if the block exits cleanly.

    Local: temp file + rename. Object stores with multipart uploads (s3, gs): streamed, and an
    exception aborts the upload (``discard``) — s3fs's own ``with open("wb")`` would commit the
    partial object. Other filesystems: buffered in memory and written with :func:`put_atomic`.
    """
    if is_local(fs):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = _tmp_path(path)
        f = open(tmp, "wb")
        try:
            yield f
            f.close()
            os.replace(tmp, path)
        except BaseException:
            f.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        invalidate(fs, path)
        return
    if fs_protocol(fs) in ("s3", "gs", "gcs"):
        f = fs.open(path, "wb", block_size=block_size)
        try:
            yield f
            f.close()
        except BaseException:
            f.discard()  # aborts the multipart upload: nothing becomes visible
            f.closed = True  # or fsspec's __del__ retries the upload of the discarded buffer
            raise
        invalidate(fs, path)
        return
    buf = io.BytesIO()
    yield buf
    put_atomic(fs, path, buf.getvalue())


# ---------------------------------------------------------------------------------------------------
# Reads, existence and listings (cache-safe)


def invalidate(fs: fsspec.AbstractFileSystem, path: Optional[str] = None) -> None:
    """Drop fsspec's listing cache for ``path`` (and its parents), or all of it."""
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path) if path is not None else fs.invalidate_cache()


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """``fs.exists`` after invalidating the listing cache (another process may have written)."""
    invalidate(fs, path)
    return fs.exists(path)


def list_files(fs: fsspec.AbstractFileSystem, prefix: str, suffix: str = "",
               recursive: bool = False) -> list[str]:
    """Sorted file paths under ``prefix`` ending in ``suffix``; temp keys skipped; [] if absent."""
    invalidate(fs, prefix)
    try:
        if recursive:
            paths = fs.find(prefix)
        else:
            paths = [e["name"] for e in fs.ls(prefix, detail=True) if e.get("type") != "directory"]
    except FileNotFoundError:
        return []
    out = []
    for p in paths:
        name = p.rsplit("/", 1)[-1]
        if TMP_MARK in name or not name.endswith(suffix):
            continue
        out.append(p)
    return sorted(out)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """Whole object as bytes."""
    return fs.cat_file(path)


def read_url(url: str, storage: StorageLike = None, field: Optional[str] = None) -> bytes:
    """The bytes of the object at ``url``. With ``field`` (the config field that named it), a missing
    object raises ``FileNotFoundError`` naming the field and the URL."""
    fs, path = filesystem(url, storage)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        if field is None:
            raise
        raise FileNotFoundError(f"{field}: {redact(url)} does not exist") from None


def cat_many(fs: fsspec.AbstractFileSystem, paths: list[str], on_error: str = "raise") -> dict[str, Any]:
    """``{path: bytes}`` of many objects in one batched, concurrent ``fs.cat``. ``on_error="return"``
    puts the exception in place of the bytes of an unreadable object instead of raising."""
    if len(paths) > 1:
        return fs.cat(paths, on_error=on_error)
    out: dict[str, Any] = {}
    for p in paths:
        try:
            out[p] = fs.cat_file(p)
        except Exception as e:
            if on_error == "raise":
                raise
            out[p] = e
    return out


def remove_stale_temps(fs: fsspec.AbstractFileSystem, prefix: str) -> int:
    """Delete temporary keys left under ``prefix`` by killed writers; returns how many."""
    invalidate(fs, prefix)
    try:
        paths = [p for p in fs.find(prefix) if TMP_MARK in p.rsplit("/", 1)[-1]]
    except FileNotFoundError:
        return 0
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(p)
    return len(paths)


# ---------------------------------------------------------------------------------------------------
# Credentials never reach a log or an error message

_SECRET_QUERY = re.compile(r"(?i)([?&](?:[^=&]*(?:key|secret|token|signature|credential|password)[^=&]*)=)[^&#\s]*")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]+@")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
_AWS_SECRET = re.compile(r"(?i)(aws_secret_access_key|secret_access_key|aws_session_token|secret|token)"
                         r"(\s*[=:]\s*['\"]?)[^\s'\",}]+")


def redact(text: str) -> str:
    """Remove credentials from a URL or message: userinfo, secret query parameters, AWS keys."""
    text = _USERINFO.sub(r"\1***@", str(text))
    text = _SECRET_QUERY.sub(r"\1***", text)
    text = _AWS_KEY_ID.sub("***", text)
    text = _AWS_SECRET.sub(r"\1\2***", text)
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        val = os.environ.get(var)
        if val and len(val) >= 8:
            text = text.replace(val, "***")
    return text


def describe(fs: fsspec.AbstractFileSystem) -> str:
    """Safe one-line description of a filesystem (protocol and endpoint, never credentials)."""
    proto = fs_protocol(fs)
    endpoint = getattr(fs, "endpoint_url", None) or getattr(fs, "client_kwargs", {}).get("endpoint_url")
    return f"{proto}" + (f" ({redact(endpoint)})" if endpoint else "")


# ---------------------------------------------------------------------------------------------------
# webdataset openers


_REGISTERED_STORAGE: dict[str, StorageConfig] = {}


def open_url(url: str, mode: str = "rb", storage: StorageLike = None, block_size: int = 8 * 2**20) -> BinaryIO:
    """Open a URL for streaming reads (or plain writes) through the storage factory."""
    fs, path = filesystem(url, storage)
    if mode == "rb" and not is_local(fs):
        return fs.open(path, "rb", block_size=block_size)
    return fs.open(path, mode)


def register_wds_opener(storage: StorageLike = None,
                        schemes: Iterable[str] = ("s3", "gs", "gcs", "memory")) -> None:
    """Install an fsspec opener into ``webdataset.gopen_schemes`` for ``schemes``.

    Process-global and inherited by fork DataLoader workers only; with spawn workers use
    :class:`ShardOpener` in an explicit ``DataPipeline`` instead.
    """
    from webdataset.gopen import gopen_schemes

    cfg = as_storage_config(storage)
    for scheme in schemes:
        _REGISTERED_STORAGE[scheme] = cfg
        gopen_schemes[scheme] = _gopen_fsspec


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> BinaryIO:
    cfg = _REGISTERED_STORAGE.get(protocol_of(url), StorageConfig())
    return open_url(url, mode, cfg)


class ShardOpener:
    """webdataset pipeline stage: ``{"url": …}`` samples → tar members, opened through fsspec.

    Picklable (holds only the storage config), so it works in fork and spawn DataLoader workers::

        wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker, ShardOpener(storage), …)
    """

    def __init__(self, storage: StorageLike = None, handler: Any = None):
        self.storage = as_storage_config(storage)
        self.handler = handler

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        from webdataset.tariterators import group_by_keys, tar_file_expander
        from webdataset.handlers import reraise_exception

        handler = self.handler or reraise_exception
        return group_by_keys(tar_file_expander(self._opened(src), handler=handler), handler=handler)

    def _opened(self, src: Iterable[dict]) -> Iterator[dict]:
        for sample in src:
            url = sample["url"]
            stream = open_url(url, "rb", self.storage)
            try:
                yield {**sample, "stream": stream}
            finally:
                stream.close()

    def __repr__(self) -> str:
        return f"ShardOpener(endpoint={redact(self.storage.endpoint_url or 'default')})"
