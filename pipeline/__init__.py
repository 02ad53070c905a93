"""The data plane: storage URLs, token shards, the Ray tokenize graph and the training readers.

Modules (import the one you need; nothing heavy is imported here):

* ``pipeline.config``   frozen-dataclass configs + the generic ``load_config`` loader
* ``pipeline.storage``  URL → filesystem, atomic writes, webdataset openers
* ``pipeline.sources``  ImageNet-layout folders and MS-COCO captions → stable item order → shards
* ``pipeline.images``   safe decode + RGB conversion + the official center crop, with reject reasons
* ``pipeline.text``     caption encoders (CLIP ViT-L/14 text tower, a small random one)
* ``pipeline.shards``   packed token shards, manifest.parquet, rejects.parquet, dataset.json
* ``pipeline.tokenize`` the Ray Data graph (list → read → decode → encode → write)
* ``pipeline.readers``  in-memory and streaming readers for training
"""
