"""Time model for the sampling job's FID-50K on N workers (GPUs), fed by measured per-stage rates.

    python benchmarks/sample_throughput.py --json runs/rates-cpu.json          # measure one worker's stages
    python benchmarks/fid50k_time.py runs/rates-cpu.json                        # the model on those rates
    python benchmarks/fid50k_time.py --official-h100 --workers 1 8 64            # arithmetic on the official
                                                                                # code's H100 figures

A rates file is what `sample_throughput.py --json` writes: the device, date and command it was measured
with, the batch size, and seconds per sample of each stage (generate, decode, inception, write) plus the
measured start-up (actors up and models loaded) and statistics merge / FID seconds. Everything this script
adds is arithmetic, and it says so:

    T(N) = start + rounds(N) * unit_size * t_sample + merge + fid
    t_sample = generate + decode + inception (+ write when it does not overlap: units_in_flight = 1 and
               the PNG threads keep up; writes run on threads beside the next batch)
    rounds(N) = ceil(num_units / N): the job hands whole units (unit_size samples, one tar / npz each) to
               workers, so the last round is partly idle when N does not divide the number of units.

The model assumes the workers do not contend for anything shared (one device each; object storage
absorbs the writes) and that every unit's last batch is as fast as the others.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

STAGES = ("generate", "decode", "inception", "write")

# The official code's own figures on one H100 (enat-facts §12, measured 2026-11-22 by the reference's
# authors with the official code: ENAT-L 8 steps, batch 250 / VQGAN batch 125 / Inception fp32 batch 250).
# They are not our measurements; the row is labelled as such wherever it is printed.
OFFICIAL_H100 = {
    "label": "official code on one H100 (enat-facts §12; ENAT-L, not ours)",
    "device": "NVIDIA H100 80GB HBM3", "date": "2026-11-22", "command": "enat-facts.md §12", "batch": 250,
    "per_sample_s": {"generate": 1 / 218, "decode": 1 / 587, "inception": 1 / 4470, "write": 0.0},
    "startup_s": None, "merge_s": None, "fid_s": None, "measured": False,
}
# CPU-measured defaults for the parts that do not scale with N (docs/benchmarks.md, fid_speed.py and
# sample_throughput.py on the 2-core CPU): merging 50 units' float64 statistics and the Fréchet distance.
DEFAULT_MERGE_S, DEFAULT_FID_S, DEFAULT_START_S = 3.5, 4.9, 30.0


def total_seconds(rates: dict, workers: int, num_samples: int = 50_000, unit_size: int = 1000,
                  overlap_writes: bool = True) -> dict:
    """-> the model's parts for `workers` workers (seconds), from one worker's per-sample stage times."""
    per = rates["per_sample_s"]
    t_sample = sum(per[s] for s in STAGES if s != "write" or not overlap_writes)
    if overlap_writes:  # writes hide behind compute only while they are the cheaper side
        t_sample = max(t_sample, per.get("write", 0.0))
    units = math.ceil(num_samples / unit_size)
    rounds = math.ceil(units / workers)
    compute = rounds * unit_size * t_sample
    start, merge, fid = (rates.get(k) if rates.get(k) is not None else d for k, d in
                         (("startup_s", DEFAULT_START_S), ("merge_s", DEFAULT_MERGE_S), ("fid_s", DEFAULT_FID_S)))
    ideal = num_samples / workers * t_sample
    return {"workers": workers, "rounds": rounds, "start": start, "compute": compute, "merge": merge,
            "fid": fid, "total": start + compute + merge + fid, "rate": 1 / t_sample,
            "tail_idle": 1 - ideal / compute}


def table(rates: dict, workers: list[int], num_samples: int, unit_size: int) -> str:
    per = rates["per_sample_s"]
    lines = [f"### {rates.get('label', rates.get('device', '?'))}", "",
             f"measured on {rates.get('device', '?')}, {rates.get('date', '?')}: `{rates.get('command', '?')}`"
             + ("" if rates.get("measured", True) else " (not our measurement)"),
             "per sample: " + ", ".join(f"{s} {1000 * per.get(s, 0.0):.2f} ms" for s in STAGES)
             + f" (batch {rates.get('batch', '?')})",
             "start-up " + ("measured" if rates.get("startup_s") is not None else f"assumed {DEFAULT_START_S:.0f} s")
             + "; merge + FID " + ("measured" if rates.get("merge_s") is not None else
                                  f"the CPU figures {DEFAULT_MERGE_S} + {DEFAULT_FID_S} s"), "",
             f"| workers | rounds of {unit_size} | start | generate+decode+Inception | merge + FID | T(N) | idle in last round |",
             "|---|---|---|---|---|---|---|"]
    for n in workers:
        m = total_seconds(rates, n, num_samples, unit_size)
        lines.append(f"| {n} | {m['rounds']} | {m['start']:.0f} s | {m['compute']:.0f} s | "
                     f"{m['merge'] + m['fid']:.0f} s | **{_hms(m['total'])}** | {100 * m['tail_idle']:.0f} % |")
    return "\n".join(lines)


def _hms(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rates", nargs="*", help="JSON files written by sample_throughput.py --json")
    ap.add_argument("--official-h100", action="store_true", help="add the official code's H100 row")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--samples", type=int, default=50_000)
    ap.add_argument("--unit-size", type=int, default=1000, help="the job's plan.unit_size")
    args = ap.parse_args(argv)
    rows = [json.loads(Path(p).read_text()) for p in args.rates]
    if args.official_h100 or not rows:
        rows.append(OFFICIAL_H100)
    for r in rows:
        print(table(r, args.workers, args.samples, args.unit_size))
        print()


if __name__ == "__main__":
    main()
