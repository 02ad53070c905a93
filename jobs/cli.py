"""`enat`: the command line. Each subcommand runs the job module of the same name.

    enat demo                      # the whole thing on embedded defaults (see README)
    enat tokenize --config x.yaml [section.field=value ...]
    enat train    --config x.yaml [...]
    enat sample   --config x.yaml [...]
    enat fid-stats --config x.yaml [...]
    enat register <checkpoint folder> [--alias candidate]
    enat submit --address http://head:8265 -- train --config x.yaml

`enat <command> --help` documents each one. The same config files work locally and on a cluster.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

# subcommand -> (module, one-line help)
COMMANDS = {
    "demo": ("jobs.demo", "run the embedded end-to-end demo (local Ray, local storage, local MLflow)"),
    "core-demo": ("jobs.core_demo", "the model library alone: tokenizer + tiny ENAT + samples, no services"),
    "tokenize": ("jobs.tokenize", "pre-tokenize images into webdataset token shards (Ray Data)"),
    "train": ("jobs.train", "train ENAT with DeepSpeed under Ray Train, tracked in MLflow"),
    "sample": ("jobs.sample", "generate samples at scale and compute FID / IS (Ray Data)"),
    "fid-stats": ("jobs.fid_stats", "reference FID statistics (mu, sigma) from real images"),
    "register": ("jobs.register", "register a training checkpoint in the MLflow model registry"),
    "submit": ("jobs.submit", "submit any of these to a Ray cluster (ray job submit)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: enat <command> [args...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `enat <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"enat: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    sys.argv = [f"enat {cmd}", *rest]
    if cmd in ("demo", "core-demo", "submit"):
        rc = module.main(rest)
        return rc if isinstance(rc, int) else 0
    from pipeline.cluster import cli

    return cli(module.main, rest, cmd)  # a user-caused error: one readable line, exit status 2


if __name__ == "__main__":
    sys.exit(main())
