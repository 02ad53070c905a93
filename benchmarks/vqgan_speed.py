"""Time enat.vqgan.VQGAN encode/decode (random weights), optionally beside the official VQModel.

    python benchmarks/vqgan_speed.py                       # MAGE f16 config, 256 px, batch 4
    python benchmarks/vqgan_speed.py --official /path/to/LeapLabTHU/ENAT   # side by side + ratio
    python benchmarks/vqgan_speed.py --tiny                # seconds-long smoke run (small config)

Ours and the official model share the same weights and inputs and are timed alternately, so load
from other processes hits both alike. Each runs with the malloc settings it is deployed with (``--allocator``).
Prints img/s (best of --repeats after one warm-up) and the best / median ratios; no asserts.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from enat.vqgan import VQGAN, VQGANConfig  # noqa: E402

TINY = VQGANConfig(resolution=64, ch=32, ch_mult=(1, 1, 1, 1, 2), num_res_blocks=2, attn_resolutions=(),
                   z_channels=32, codebook_size=64, embed_dim=32)


def official_vqmodel(root: str, cfg: VQGANConfig) -> torch.nn.Module:
    """The official taming VQModel for ``cfg`` (random weights), imported from a checkout."""
    sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location("official_taming_vqgan", os.path.join(root, "taming/models/vqgan.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ddconfig = dict(double_z=False, z_channels=cfg.z_channels, resolution=cfg.resolution, in_channels=3,
                    out_ch=3, ch=cfg.ch, ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                    attn_resolutions=list(cfg.attn_resolutions), dropout=0.0)
    return module.VQModel(ddconfig=ddconfig, lossconfig=None, n_embed=cfg.codebook_size,
                          embed_dim=cfg.embed_dim).eval()


CLOCK = time.perf_counter


def elapsed(fn: Callable[[], object]) -> float:
    t = CLOCK()
    fn()
    return CLOCK() - t


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=None, help="default: the config's (256; 64 with --tiny)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--official", default=None, help="path of a LeapLabTHU/ENAT checkout to time beside ours")
    ap.add_argument("--tiny", action="store_true", help="small config for a quick smoke run")
    ap.add_argument("--decode-dtype", default=None, choices=[None, "bfloat16", "float16"],
                    help="also time decode under autocast with this dtype")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU time (with --threads 1, robust on a shared machine: "
                         "time spent waiting for a core is not counted)")
    ap.add_argument("--allocator", choices=["deployed", "default", "kept"], default="deployed",
                    help="glibc malloc per call: deployed (default) = ours as our CPU workers run it, freed "
                         "memory kept (pipeline.cluster.keep_freed_memory), the official as its scripts run "
                         "it (glibc's defaults), switched before each call; default / kept = both alike")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = TINY if args.tiny else VQGANConfig.preset("mage-f16")
    res = args.resolution or cfg.resolution
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours = VQGAN(cfg)
    official = None
    if args.official:
        official = official_vqmodel(args.official, cfg)
        ours = VQGAN.from_official(official.state_dict(), cfg)  # same weights
        official.to(device)
    ours.to(device)
    images = torch.rand(args.batch, 3, res, res, device=device)
    codes = torch.randint(0, cfg.codebook_size, (args.batch, res // cfg.downsample, res // cfg.downsample),
                          device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    from benchmarks.official import set_allocator

    def allocator(name: str) -> None:  # outside the case's timed call
        set_allocator(args.allocator, ours=name.startswith("ours"))

    def timed(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            out = fn()
            sync()
            return out
        return run

    cases: dict[str, Callable[[], object]] = {
        "ours encode": timed(lambda: ours.encode(images)),
        "ours decode": timed(lambda: ours.decode(codes)),
    }
    if args.decode_dtype:
        dt = getattr(torch, args.decode_dtype)
        cases[f"ours decode {args.decode_dtype}"] = timed(lambda: ours.decode(codes, dtype=dt))
    if official is not None:
        def off_encode() -> torch.Tensor:
            with torch.no_grad():
                return official.encode(images)[2][2]

        def off_decode() -> torch.Tensor:
            with torch.no_grad():
                return official.decode_code(codes)

        cases["official encode"] = timed(off_encode)
        cases["official decode"] = timed(off_decode)

    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} res={res} clock={args.clock} allocator={args.allocator} "
          f"config={'tiny' if args.tiny else 'mage-f16'} torch={torch.__version__}")
    for name, fn in cases.items():  # warm-up (allocator, oneDNN primitive caches)
        allocator(name)
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats):  # interleaved so background load hits every case alike
        for name, fn in cases.items():
            allocator(name)
            times[name].append(elapsed(fn))
    rate = {k: args.batch / min(v) for k, v in times.items()}
    for name, r in rate.items():
        print(f"{name:24s} {r:8.2f} img/s   (best {min(times[name]):.3f} s of {args.repeats})")
    if official is not None:
        for op in ("encode", "decode"):
            med = statistics.median(times[f"official {op}"]) / statistics.median(times[f"ours {op}"])
            print(f"{op}: ours / official = {rate[f'ours {op}'] / rate[f'official {op}']:.2f}x best, "
                  f"{med:.2f}x median")
        same = torch.equal(cases["ours encode"]().cpu(), cases["official encode"]().view(codes.shape).cpu())
        err = (cases["ours decode"]() - cases["official decode"]().clamp(0, 1)).abs().max().item()
        print(f"codes identical: {same}; decode max abs diff (clamped): {err:.2e}")


if __name__ == "__main__":
    main()
