"""``multiface ingest``, ``multiface verify`` and ``multiface status``.

multiface ingest ENTITY_DIR --out SHARD_DIR [--workers N] [--shard-size SIZE] [--image-codec png|delta-zstd|delta-rice] [--photo-shards]
multiface verify SHARD_DIR/<entity>
multiface status ENTITY_DIR [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from shards.codecs import IMAGE_CODECS
from shards.errors import FormatError
from shards.ingest import DEFAULT_SHARD_SIZE, IngestBusy, IngestProgress, ingest, parse_size
from shards.manifest import MANIFEST_NAME, load_manifest, verify_folder


def register_ingest(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ingest",
        help="write an entity as WebDataset shards with a checksummed manifest",
        description="Write a downloaded entity (real Multiface layout) as WebDataset tar shards under "
        "SHARD_DIR/<entity folder name>/, with meta/ files and manifest.json. Resumes an interrupted run; "
        "samples with missing or corrupt files are left out and listed in the manifest.",
    )
    parser.add_argument("entity_dir", type=Path, help="entity folder, e.g. m--20180227--0000--6795937--GHS")
    parser.add_argument("--out", type=Path, required=True, help="shard root: one folder per entity goes here")
    parser.add_argument(
        "--workers", type=int, default=None, help="shards written at once (default: CPU count)"
    )
    parser.add_argument(
        "--shard-size",
        type=parse_size,
        default=DEFAULT_SHARD_SIZE,
        help="target shard size, e.g. 1GB (default), 256MB",
    )
    parser.add_argument(
        "--image-codec",
        choices=IMAGE_CODECS,
        default="png",
        help="how images are stored: png = the release's bytes (default); delta-zstd = lossless, "
        "decodes about 4x faster, needs the zstandard package; delta-rice = lossless, decoded on "
        "the trainer's GPU (see shards/README.md)",
    )
    parser.add_argument(
        "--photo-shards",
        action="store_true",
        help="store each shard's photos in a companion shard (<shard>.photo.tar), so that "
        "training without the screen loss downloads about 40%% of the bytes",
    )
    parser.set_defaults(func=run_ingest)


def run_ingest(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:
        print(f"--workers {args.workers}: use 1 or more", file=sys.stderr)
        return 2
    progress = IngestProgress()
    bar = tqdm(total=0, unit="sample", desc="ingest", file=sys.stderr, dynamic_ncols=True)

    def tick() -> None:
        bar.total = progress.samples_total
        bar.n = progress.samples_done
        bar.set_postfix_str(
            f"{progress.rate / 1e6:.1f} MB/s, {len(progress.excluded)} excluded", refresh=False
        )
        bar.update(0)

    try:
        manifest = ingest(
            args.entity_dir,
            args.out,
            workers=args.workers,
            shard_size=args.shard_size,
            progress=progress,
            on_sample=tick,
            image_codec=args.image_codec,
            photo_shards=args.photo_shards,
        )
    except (FormatError, FileNotFoundError, ValueError, IngestBusy, OSError, ImportError) as error:
        bar.close()
        print(f"ingest failed: {error}", file=sys.stderr)
        return 1
    tick()
    bar.close()
    folder = Path(args.out) / manifest.entity
    print(f"{folder / MANIFEST_NAME}: {len(manifest.shards)} shards, {manifest.num_samples} samples", end="")
    print(f", {len(manifest.excluded)} excluded")
    for item in manifest.excluded[:20]:
        print(f"  excluded {item.key}: {item.path}: {item.reason}")
    if len(manifest.excluded) > 20:
        print(f"  ... and {len(manifest.excluded) - 20} more (see {MANIFEST_NAME})")
    return 0


def register_verify(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="re-hash shards against their manifest",
        description="Re-hash every shard and metadata file of an entity's shard folder against manifest.json "
        "and name what is missing or corrupt. Exit status 1 if anything is.",
    )
    parser.add_argument("shard_dir", type=Path, help="an entity's shard folder (holds manifest.json)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    folder = Path(args.shard_dir)
    try:
        manifest = load_manifest(folder)
    except (FileNotFoundError, FormatError) as error:
        print(f"verify failed: {error}", file=sys.stderr)
        return 1
    total = sum(entry.bytes for entry in manifest.files().values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", file=sys.stderr) as bar:
        report = verify_folder(folder, progress=bar.update)
    if args.json:
        print(
            json.dumps(
                {"ok": report.ok, **report.__dict__, "problems": [p.__dict__ for p in report.problems]}
            )
        )
    else:
        print(
            f"{folder}: {report.num_files} files, {report.num_bytes / 1e6:.1f} MB checked, manifest {report.state}"
        )
        for problem in report.problems:
            print(f"  {problem.problem.upper():7s} {problem.name}: {problem.detail}")
        print("OK" if report.ok else f"{len(report.problems)} problem(s)")
    return 0 if report.ok else 1


def register_status(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="completeness of a downloaded entity",
        description="Scan an entity folder and report which metadata, photos, textures, meshes and audio are "
        "present or missing, per expression and camera, and how many samples are trainable.",
    )
    parser.add_argument("entity_dir", type=Path, help="entity folder, e.g. m--20180227--0000--6795937--GHS")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.set_defaults(func=run_status)


def run_status(args: argparse.Namespace) -> int:
    from shards.completeness import format_report, scan_entity

    try:
        report = scan_entity(Path(args.entity_dir))
    except FileNotFoundError as error:
        print(f"status failed: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_report(report))
    return 0
