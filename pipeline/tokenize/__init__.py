"""The tokenize job: images → VQ token shards on Ray Data (:mod:`.job`), its stages (:mod:`.encode`),
the listing of ImageNet-layout folders and MS-COCO captions (:mod:`.sources`) and its config (:mod:`.config`)."""
from pipeline.tokenize.config import (ImageConfig, OutputSection, SourceConfig, TokenizeComputeSection,
                                      TokenizeJobConfig, TokenizeSection)
from pipeline.tokenize.job import config_fingerprint, run_tokenize

__all__ = ["ImageConfig", "OutputSection", "SourceConfig", "TokenizeComputeSection", "TokenizeJobConfig",
           "TokenizeSection", "config_fingerprint", "run_tokenize"]
