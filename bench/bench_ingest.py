"""Ingest throughput against ``tar -cf`` of the same files on the same disk, in the same run.

    python bench/bench_ingest.py [--frames 24] [--cameras 6] [--workers N] [--runs 3]

Builds a real-size synthetic entity (2048x1334 photos, 1024 textures) of one expression:
two frames are synthesised and copied to ``--frames`` frames (content does not change the cost
of reading, checking and hashing bytes). Then, alternating, runs ``tar -cf`` over the files a
sample is made of and ``multiface ingest`` into a fresh folder, and reports MB/s of each (bytes
written per second; ingest also reads each frame's average texture and mesh once per camera, as
the samples carry them), the median of ``--runs`` runs and the ratio. Page cache is warm for both.
Prints a Markdown row and appends it to bench/results_ingest.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shards.ingest import ingest
from shards.synth import synthesize


def build_tree(base: Path, frames: int, cameras: int) -> Path:
    entity = synthesize(base, expressions=1, frames=2, cameras=cameras, seed=11)
    replicate_frames(entity, frames)
    return entity


def replicate_frames(entity: Path, frames: int) -> None:
    """Copy a one-expression entity's frames to ``frames`` frames (3 apart) and rewrite its frame list."""
    lines = [line.split() for line in (entity / "frame_list.txt").read_text().splitlines() if line.strip()]
    expression, first = lines[0]
    targets = [f"{int(first) + 3 * index:06d}" for index in range(frames)]
    sources = [frame for _, frame in lines]
    for index, frame in enumerate(targets):
        source = sources[index % len(sources)]
        if frame == source:
            continue
        for folder in sorted((entity / "images" / expression).iterdir()) + sorted(
            (entity / "unwrapped_uv_1024" / expression).iterdir()
        ):
            shutil.copyfile(folder / f"{source}.png", folder / f"{frame}.png")
        mesh = entity / "tracked_mesh" / expression
        for suffix in (".bin", ".obj", "_transform.txt"):
            shutil.copyfile(mesh / f"{source}{suffix}", mesh / f"{frame}{suffix}")
    (entity / "frame_list.txt").write_text("".join(f"{expression} {frame}\n" for frame in targets))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--cameras", type=int, default=6)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder)")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-ingest-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    entity = build_tree(work / "raw", args.frames, args.cameras)
    print(f"tree built in {time.monotonic() - started:.1f} s: {entity}", file=sys.stderr)
    members = ["images", "unwrapped_uv_1024", "tracked_mesh"]
    tar_rates, ingest_rates = [], []
    tar_bytes = ingest_bytes = 0
    for run in range(args.runs):
        target = work / f"archive-{run}.tar"
        began = time.monotonic()
        subprocess.run(["tar", "-cf", str(target), "-C", str(entity), *members], check=True)
        os.sync()
        elapsed = time.monotonic() - began
        tar_bytes = target.stat().st_size
        tar_rates.append(tar_bytes / elapsed / 1e6)
        target.unlink()
        out = work / f"shards-{run}"
        began = time.monotonic()
        manifest = ingest(entity, out, workers=args.workers)
        elapsed = time.monotonic() - began
        ingest_bytes = sum(shard.bytes for shard in manifest.shards)
        ingest_rates.append(ingest_bytes / elapsed / 1e6)
        shutil.rmtree(out)
    tar_rate, ingest_rate = statistics.median(tar_rates), statistics.median(ingest_rates)
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        "?",
    )
    command = f"python bench/bench_ingest.py --frames {args.frames} --cameras {args.cameras} --workers {args.workers} --runs {args.runs}"
    row = (
        f"| {platform.machine()}, {os.cpu_count()} cores, {cpu} | `{command}` | {args.frames * args.cameras} samples, "
        f"tar {tar_bytes / 1e6:.0f} MB, shards {ingest_bytes / 1e6:.0f} MB | {tar_rate:.0f} "
        f"({', '.join(f'{rate:.0f}' for rate in tar_rates)}) | {ingest_rate:.0f} "
        f"({', '.join(f'{rate:.0f}' for rate in ingest_rates)}) | {ingest_rate / tar_rate:.2f} |"
    )
    header = "| machine | command | data | tar -cf MB/s (runs) | ingest MB/s (runs) | ingest / tar |\n|---|---|---|---|---|---|"
    print(header)
    print(row)
    results = Path(__file__).with_name("results_ingest.md")
    if not results.exists():
        results.write_text(
            "## Ingest throughput against tar -cf (same files, same disk, same run)\n\n" + header + "\n"
        )
    with open(results, "a") as handle:
        handle.write(row + "\n")
    if args.dir is None:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
