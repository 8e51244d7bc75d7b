"""Benchmark the completeness scan (``shards.completeness.scan_entity``) on a million-file tree.

Builds an entity in the real Multiface layout with empty images, textures and meshes (the scan
only lists folders, so sizes do not matter) and real small metadata files, then times
``scan_entity`` in a fresh process per run and writes a Markdown section to
``bench/results_scan.md``. The tree is reused when ``--dir`` already holds one built with the
same parameters.

Run::

    .venv/bin/python bench/bench_scan.py                       # temp dir, removed afterwards
    .venv/bin/python bench/bench_scan.py --dir /data/bench-tree  # keep and reuse the tree
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from shards.layout import AUDIO_DIR, AVERAGE_DIR, MESH_DIR, NUM_VERTICES, PHOTO_DIR, TEXTURE_DIR

ENTITY = "m--20180227--0000--6795937--GHS"
EXPRESSION_PREFIXES = ("E0{:02d}_Expression", "EXP_Range_{:02d}", "SEN_sentence_{:02d}")

# Runs in a fresh interpreter so that each timing includes no state left by the previous run.
_CHILD = """
import json, resource, sys, time
from pathlib import Path
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
start = time.perf_counter()
from shards.completeness import scan_entity
imported, cpu_start = time.perf_counter(), cpu()
report = scan_entity(Path(sys.argv[1]))
scanned, cpu_end = time.perf_counter(), cpu()
print(json.dumps({"import_s": imported - start, "scan_s": scanned - imported, "cpu_s": cpu_end - cpu_start,
                  "num_files": report.num_files, "num_missing": len(report.missing),
                  "num_samples": report.num_samples,
                  "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _photo_frames(num_frames: int, camera: str, hole_every: int) -> list[int]:
    # Every hole_every-th photo is left out (staggered per camera), so the scan also builds a
    # missing list, as it does on a real download with dropped frames.
    return [i for i in range(num_frames) if hole_every <= 0 or (i + int(camera)) % hole_every]


def plan(num_files: int, cameras: list[str], num_expressions: int, hole_every: int) -> int:
    """The fewest frames per expression for which the tree holds at least ``num_files`` files."""
    files_per_frame = 2 * len(cameras) + 4  # photo + texture per camera, average, .bin, .obj, transform
    num_frames = max(1, num_files // (num_expressions * files_per_frame))
    while True:
        num_holes = sum(num_frames - len(_photo_frames(num_frames, camera, hole_every)) for camera in cameras)
        if num_expressions * (num_frames * files_per_frame - num_holes) >= num_files:
            return num_frames
        num_frames += 1


def _touch_all(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=folder_fd))
    finally:
        os.close(folder_fd)


def _write_metadata(root: Path, cameras: list[str], frame_list: list[tuple[str, str]]) -> None:
    blocks = [
        f"{camera}\n1000 0 667\n0 1000 1024\n0 0 1\n0 0 0 0 0\n1 0 0 0\n0 1 0 0\n0 0 1 1000\n\n"
        for camera in cameras
    ]
    (root / "KRT").write_text("".join(blocks))
    (root / "frame_list.txt").write_text(
        "".join(f"{expression} {frame}\n" for expression, frame in frame_list)
    )
    png = io.BytesIO()
    Image.fromarray(np.zeros((1024, 1024, 3), np.uint8)).save(png, format="PNG")
    (root / "tex_mean.png").write_bytes(png.getvalue())
    (root / "tex_var.txt").write_text("2500.0\n")
    (root / "vert_mean.bin").write_bytes(np.zeros(NUM_VERTICES * 3, np.float32).tobytes())
    (root / "vert_var.txt").write_text("1.5\n")


def build_tree(root: Path, num_files: int, num_cameras: int, num_expressions: int, hole_every: int) -> dict:
    """Create the entity tree, or reuse it when its parameters match; returns its description."""
    params = {
        "num_files": num_files,
        "num_cameras": num_cameras,
        "num_expressions": num_expressions,
        "hole_every": hole_every,
    }
    marker = root / ".bench_scan.json"
    if marker.exists():
        built = json.loads(marker.read_text())
        if built["params"] == params:
            return {**built, "reused": True}
        shutil.rmtree(root)
    start = time.perf_counter()
    cameras = [str(400000 + 2 * i) for i in range(num_cameras)]
    num_frames = plan(num_files, cameras, num_expressions, hole_every)
    expressions = [EXPRESSION_PREFIXES[i % 3].format(i) for i in range(num_expressions)]
    frames = [f"{1000 + 3 * i:06d}" for i in range(num_frames)]
    root.mkdir(parents=True, exist_ok=True)
    _write_metadata(root, cameras, [(expression, frame) for expression in expressions for frame in frames])
    pngs = [f"{frame}.png" for frame in frames]
    num_created = num_holes = 0
    for expression in expressions:
        meshes = [f"{frame}{suffix}" for frame in frames for suffix in (".bin", ".obj", "_transform.txt")]
        _touch_all(root / MESH_DIR / expression, meshes)
        _touch_all(root / TEXTURE_DIR / expression / AVERAGE_DIR, pngs)
        num_created += len(meshes) + len(pngs)
        for camera in cameras:
            photos = [pngs[i] for i in _photo_frames(num_frames, camera, hole_every)]
            _touch_all(root / PHOTO_DIR / expression / camera, photos)
            _touch_all(root / TEXTURE_DIR / expression / camera, pngs)
            num_created += len(photos) + len(pngs)
            num_holes += len(pngs) - len(photos)
        if expression.startswith("SEN_"):
            _touch_all(root / AUDIO_DIR, [f"{expression}.wav"])
            num_created += 1
    built = {
        "params": params,
        "num_frames_per_expression": num_frames,
        "num_created": num_created,
        "num_holes": num_holes,
        "create_s": time.perf_counter() - start,
    }
    marker.write_text(json.dumps(built))
    return {**built, "reused": False}


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores, {model}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir", type=Path, help="where to build (or reuse) the tree; default a temp dir, removed after"
    )
    parser.add_argument(
        "--files", type=int, default=1_000_000, help="files to create, at least (default 1,000,000)"
    )
    parser.add_argument("--cameras", type=int, default=160, help="cameras, as a v2 entity (default 160)")
    parser.add_argument("--expressions", type=int, default=20, help="expressions (default 20)")
    parser.add_argument("--hole-every", type=int, default=100, help="leave out every N-th photo (0: none)")
    parser.add_argument("--runs", type=int, default=3, help="timed scans, each in a fresh process")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("results_scan.md"))
    args = parser.parse_args(argv)

    workdir = args.dir or Path(tempfile.mkdtemp(prefix="bench_scan_"))
    root = workdir / ENTITY
    try:
        tree = build_tree(root, args.files, args.cameras, args.expressions, args.hole_every)
        how = "reused" if tree["reused"] else f"created in {tree['create_s']:.1f} s"
        print(
            f"tree: {tree['num_created']:,} files ({tree['num_holes']:,} photos left out), {how}", flush=True
        )
        runs = []
        for run in range(args.runs):
            child = subprocess.run(
                [sys.executable, "-c", _CHILD, str(root)], check=True, capture_output=True, text=True
            )
            runs.append({**json.loads(child.stdout), "load": os.getloadavg()[0]})
            print(
                f"run {run + 1}: scan {runs[-1]['scan_s']:.2f} s, CPU {runs[-1]['cpu_s']:.2f} s "
                f"(import {runs[-1]['import_s']:.2f} s, "
                f"load average {runs[-1]['load']:.1f})",
                flush=True,
            )
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    median = statistics.median(run["scan_s"] for run in runs)
    median_cpu = statistics.median(run["cpu_s"] for run in runs)
    command = "python bench/bench_scan.py " + " ".join(argv if argv is not None else sys.argv[1:])
    row = (
        f"| {machine()} | `{command.strip()}` | {runs[0]['num_files']:,} | {median:.2f} | {median_cpu:.2f} "
        f"| {', '.join(format(run['scan_s'], '.2f') for run in runs)} "
        f"| {', '.join(format(run['load'], '.1f') for run in runs)} |"
    )
    section = "\n".join(
        [
            "## Completeness scan (`shards.completeness.scan_entity`)",
            "",
            f"Tree: one entity, {args.cameras} cameras, {args.expressions} expressions x "
            f"{tree['num_frames_per_expression']} frames, {tree['num_created']:,} empty files "
            f"({tree['num_holes']:,} photos left out), created in {tree['create_s']:.1f} s"
            f"{' (an earlier run; reused)' if tree['reused'] else ''}. "
            f"Each scan runs in a fresh process (page and dentry caches warm; not dropped). "
            f"Scan result: {runs[0]['num_missing']:,} missing items, {runs[0]['num_samples']:,} trainable samples, "
            f"peak RSS {max(run['max_rss_mib'] for run in runs):.0f} MiB. Goal: under 10 s. "
            "The load column is the 1-minute load average after each run: the machine is shared, "
            "and a load above the core count stretches wall time; CPU seconds (user + system of "
            "the scanning process) do not depend on it.",
            "",
            "| machine | command | files | scan seconds (median) | CPU seconds (median) | runs (s) | load |",
            "|---|---|---|---|---|---|---|",
            row,
            "",
        ]
    )
    args.output.write_text(section)
    print(row)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
