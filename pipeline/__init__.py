"""The data plane: shared modules below, one package per job (``tokenize``, ``train``, ``sample``).

Shared modules (import the one you need; nothing heavy is imported here):

* ``pipeline.config``    the typed config loader (YAML + ``section.field=value``, presets, renamed keys)
* ``pipeline.sections``  the config sections every job shares (storage, ray, compute, mlflow)
* ``pipeline.storage``   URL → filesystem, atomic writes, batched reads, webdataset openers
* ``pipeline.ranged``    ranged reads of one object (a seekable file by range GETs, .npy rows)
* ``pipeline.cluster``   the Ray session, the worker's device, the actor-pool runner, a job's main
* ``pipeline.commits``   fingerprints, unit seeds, commit records and the one resume protocol
* ``pipeline.models``    ENAT's architecture, the VQ tokenizer and the FID Inception from their sections
* ``pipeline.images``    safe decode + RGB conversion + the official center crops, with reject reasons
* ``pipeline.text``      caption encoders (CLIP ViT-L/14 text tower, a small random one)
* ``pipeline.shards``    packed token shards, manifest.parquet, rejects.parquet, dataset.json
* ``pipeline.readers``   in-memory and streaming token readers for training
* ``pipeline.tracking``  MLflow (the only module that imports it)

Job packages: ``pipeline.tokenize`` (Ray Data: list → read → decode → encode → write shards),
``pipeline.train`` (DeepSpeed under Ray Train or torchrun), ``pipeline.sample`` (samples at scale, FID / IS,
and the fid-stats job).
"""
