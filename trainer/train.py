"""Train a Multiface deep appearance model from shards.

    torchrun --nproc_per_node=N -m trainer.train --shards URL [reference flags...]
    multiface train [--nproc N] --shards URL [reference flags...]

``--shards`` takes the data service's manifest URL or a local shard folder; every other flag
keeps the reference train.py's name (``--help`` lists them).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from trainer.config import add_arguments, config_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(build_parser().parse_args(argv))
    from trainer.distributed import init_distributed, shutdown
    from trainer.loop import Trainer

    env = init_distributed(config.device, config.collective_timeout)
    try:
        Trainer(config, env).train()
    finally:
        shutdown()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model from shards (torchrun under the hood)",
        description="Train with the reference flags. With --nproc N > 1 this runs "
        "`torchrun --standalone --nproc_per_node N -m trainer.train ...`; for several nodes call torchrun "
        "yourself (see deploy/).",
    )
    parser.add_argument(
        "--nproc", type=int, default=1, help="processes (GPUs, or gloo ranks on CPU) on this node"
    )
    add_arguments(parser)
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        print(f"--nproc {args.nproc}: use 1 or more", file=sys.stderr)
        return 2
    forwarded = [arg for arg in sys.argv[sys.argv.index("train") + 1 :]]
    forwarded = drop_flag(forwarded, "--nproc")
    if args.nproc == 1 and "RANK" not in os.environ:
        return main(forwarded)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
    ]
    return subprocess.call([*command, "-m", "trainer.train", *forwarded])


def drop_flag(arguments: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for argument in arguments:
        if skip:
            skip = False
            continue
        if argument == flag:
            skip = True
            continue
        if argument.startswith(flag + "="):
            continue
        out.append(argument)
    return out


if __name__ == "__main__":
    sys.exit(main())
