"""The sample job (samples at scale, distributed FID / IS) and the fid-stats job (reference statistics
from real images): configs in :mod:`.config`, the plan in :mod:`.plan`, the worker in :mod:`.runner`, the
bytes in :mod:`.formats`, the driver in :mod:`.job` and the fid-stats job in :mod:`.fid_stats`."""
from pipeline.sample.config import (FIDSection, OutputSection, PlanSection, RealImagesConfig, SampleComputeSection,
                                    SampleJobConfig, SampleMLflowSection, SampleModelSection, SamplerSection)
from pipeline.sample.fid_stats import FidStatsJobConfig, RealStatsActor, RealUnit, run_fid_stats
from pipeline.sample.formats import (merge_stats, npz_bytes, png_bytes, read_unit_stats, stats_from_npz,
                                     stats_npz_bytes)
from pipeline.sample.job import finalize, run_sample
from pipeline.sample.plan import (SamplePlan, Unit, balanced_labels, build_plan, caption_plan, make_units,
                                  read_prompts, uniform_labels)
from pipeline.sample.runner import SampleActor, UnitRunner

__all__ = ["FIDSection", "OutputSection", "PlanSection", "RealImagesConfig", "SampleComputeSection", "SampleJobConfig",
           "SampleMLflowSection", "SampleModelSection", "SamplerSection", "FidStatsJobConfig",
           "RealStatsActor", "RealUnit", "run_fid_stats", "merge_stats", "npz_bytes", "png_bytes", "read_unit_stats",
           "stats_from_npz", "stats_npz_bytes", "finalize", "run_sample", "SamplePlan", "Unit", "balanced_labels",
           "build_plan", "caption_plan", "make_units", "read_prompts", "uniform_labels", "SampleActor", "UnitRunner"]
