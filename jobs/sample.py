"""Sample at scale and score FID / IS: ``python -m jobs.sample --config x.yaml [section.field=value ...]``.

Locally this starts an embedded Ray on 127.0.0.1; under ``ray job submit`` (RAY_ADDRESS set) it joins
the cluster::

    python -m jobs.sample --preset imagenet-256 model.checkpoint=s3://ckpt/enat-l/nnet_ema.pth \\
        tokenizer.weights=s3://weights/vqgan_jax_strongaug.ckpt \\
        inception.weights=s3://weights/pt_inception-2015-12-05-6726825d.pth \\
        fid.reference=s3://weights/fid_stats_imagenet256_guided_diffusion.npz output.uri=s3://runs/fid50k
    ray job submit --working-dir . -- python -m jobs.sample --config sample.yaml \\
        compute.workers=8 compute.gpus_per_worker=1 sampler.precision=bf16 mlflow.parent_run_id=<train run>

Presets (``--preset``): imagenet-256, imagenet-512, coco-256. Defaults are the paper's FID-50K protocol
(50 samples per class in class order, the ImageNet-256 sampler settings, seed 1234). Rerunning the same
command resumes: committed units are skipped and the statistics merged again. The resolved config is
printed first and recorded in ``{output.uri}/plan.json`` and as MLflow params. Without
``inception.weights`` the samples are still written and FID / IS are reported as unavailable.

Example config (FID-50K of ENAT-L at 256 px on 8 GPUs; every field is in pipeline.sample.config)::

    model:
      checkpoint: s3://enat-weights/enat-l-256/nnet_ema.pth   # or <train checkpoint>/step_*/ema.pt
      preset: enat-l            # null: read config.json beside the checkpoint (our training export)
    tokenizer:
      kind: vqgan
      weights: s3://enat-weights/vqgan_jax_strongaug.ckpt
      precision: fp16           # the decoder's autocast, as the official eval
    sampler:
      preset: imagenet-256      # 8 steps, cfg 2.5, mask_temp 1.5, sample_temp 6 (enat-facts §6)
      precision: bf16
    plan:
      num_samples: 50000        # 50 per class, in class order
      seed: 1234
      unit_size: 1000
      batch_size: 125
    inception:
      weights: s3://enat-weights/pt_inception-2015-12-05-6726825d.pth
    fid:
      reference: s3://enat-weights/fid_stats/fid_stats_imagenet256_guided_diffusion.npz
    output:
      uri: s3://enat-runs/samples/enat-l-256-fid50k
      png: true
      npz: false                # true: ADM-style npz per unit (adm_npz: one samples_50000x256x256x3.npz)
    compute:
      workers: 8
      gpus_per_worker: 1
      cpus_per_worker: 8
      units_in_flight: 2        # write one unit while the next one computes
    mlflow:
      experiment: enat
      parent_run_id: null       # the training run's id: this job becomes its child run
"""
from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

from pipeline.cluster import run_job
from pipeline.config import parse_job_args
from pipeline.sample import SampleJobConfig, run_sample


def parse_args(argv: Optional[Sequence[str]] = None) -> SampleJobConfig:
    return parse_job_args(SampleJobConfig, argv, "python -m jobs.sample", __doc__.split("\n")[0])


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the job; returns the results summary (fid, is, num_samples, timings …)."""
    return run_job(parse_args(argv), "sample", run_sample)


if __name__ == "__main__":
    from pipeline.cluster import cli

    sys.exit(cli(main, sys.argv[1:], "sample"))
