"""``multiface synth``: write a synthetic Multiface entity.

Examples::

    multiface synth /data/synthetic                      # real sizes: 2048x1334 photos, 1024 textures
    multiface synth /tmp/small --photo-size 128x84 --tex-size 64 --frames 3 --cameras 3

Prints only the entity folder on stdout (progress goes to stderr), so scripts can do
``root=$(multiface synth OUT)``.
"""

from __future__ import annotations

import argparse
import sys

from shards.layout import PHOTO_COLS, PHOTO_ROWS, TEXTURE_SIZE
from shards.synth.capture import EXPRESSIONS
from shards.synth.config import SynthConfig, parse_photo_size
from shards.synth.entity import synthesize

_DEFAULTS = SynthConfig()


def _photo_size(text: str) -> tuple[int, int]:
    try:
        return parse_photo_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 0")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``synth`` subcommand."""
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic Multiface entity (real layout and formats) for tests and demos",
        description=(
            "Write one synthetic entity m--YYYYMMDD--HHMM--<ID>--GHS inside OUT_DIR and print its path. "
            "Same arguments give byte-identical files."
        ),
    )
    parser.add_argument(
        "out_dir", metavar="OUT_DIR", help="folder to write the entity folder into (created if missing)"
    )
    parser.add_argument(
        "--expressions",
        type=_positive,
        default=_DEFAULTS.num_expressions,
        help=f"number of expressions, taken in a fixed order starting {', '.join(EXPRESSIONS[:3])}, ... "
        f"(at most {len(EXPRESSIONS)}; default %(default)s)",
    )
    parser.add_argument(
        "--frames",
        type=_positive,
        default=_DEFAULTS.num_frames,
        help="frames per expression (default %(default)s)",
    )
    parser.add_argument(
        "--cameras",
        type=_positive,
        default=_DEFAULTS.num_cameras,
        help="cameras in the rig (default %(default)s)",
    )
    parser.add_argument(
        "--photo-size",
        type=_photo_size,
        default=(PHOTO_ROWS, PHOTO_COLS),
        metavar="ROWSxCOLS",
        help=f"photo size (default {PHOTO_ROWS}x{PHOTO_COLS}, the real one; e.g. 128x84 for tests)",
    )
    parser.add_argument(
        "--tex-size",
        type=_positive,
        default=TEXTURE_SIZE,
        help="texture side in texels (default %(default)s, the real one)",
    )
    parser.add_argument(
        "--seed", type=_non_negative, default=_DEFAULTS.seed, help="entity seed (default %(default)s)"
    )
    parser.add_argument(
        "--workers", type=_positive, default=1, help="processes generating frames (default %(default)s)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing entity folder of the same name"
    )
    parser.add_argument("--no-progress", action="store_true", help="do not draw a progress bar on stderr")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``multiface synth``; returns the exit status (2 for bad values or an existing folder)."""
    try:
        root = synthesize(
            args.out_dir,
            expressions=args.expressions,
            frames=args.frames,
            cameras=args.cameras,
            photo_size=args.photo_size,
            tex_size=args.tex_size,
            seed=args.seed,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (ValueError, FileExistsError) as error:
        print(f"multiface synth: error: {error}", file=sys.stderr)
        return 2
    print(root)
    return 0
