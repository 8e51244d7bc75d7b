"""Input pipeline: can the shard stream keep the trainer's GPU fed? One command, three parts.

    python bench/bench_input.py                                   # CPU: codecs + loader, 1 and 2 workers
    python bench/bench_input.py --device cuda --workers 1,4,8,16  # adds the trainer: ceiling vs streaming
    python bench/bench_input.py --smoke                           # small images, seconds (CI check)

Data: a synthetic entity at the real size (2048 x 1334 photos, 1024 textures), one expression,
2 frames x ``--cameras`` synthesised and copied to ``--frames`` frames, with Gaussian noise of
``--noise`` grey levels added to every image (synthetic renders are far smoother than real
photos: a noisy photo's PNG is about 4.4 MB, near a real one's, against 0.7 MB without), then
ingested once per ``--forms``: ``--image-codec png`` (the release's bytes), ``delta-zstd`` and
``delta-rice`` (decoded on the GPU by ``trainer.gpu_rice``); a form ending in ``+photos`` is
ingested with ``--photo-shards`` (photos in companion shards), e.g. ``delta-rice+photos``.

Parts (``--parts``):
- codec: decode ms and bytes of one photo and one texture per stored form, one core; for
  delta-rice also the GPU decode of a batch (``--device cuda``).
- loader: decoded samples/s of ``trainer.data.ShardStream`` in a DataLoader (batch 16, the screen-
  loss fields, and with ``--loader-fields screen,no-screen`` those without the photo too) for
  every form x path (cpu: ``decode_sample`` in the workers; device: uint8
  ``decode_stored`` in the workers + ``finish_on_device``) x source (local folder; the data
  service ``multiface serve`` on a loopback port) x worker count, with CPU ms per sample of the
  loader's processes and of the server, bytes on the wire per sample and the workers' peak RSS.
- train (``--device cuda``): the real step (``run_net`` + backward + clip + both Adam steps, as
  ``trainer.loop``) on the base model, tex 1024, batch 16, with and without the screen loss:
  the ceiling (one batch kept on the GPU) against streaming from the data service, in the same
  run, with the GPU busy fraction (CUDA events around each step / wall time).

Results go to ``--output`` (default bench/results_input.md) with machine, card and command.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from bench_ingest import replicate_frames  # bench/ is on sys.path when run as a script

from shards.codecs import decode_dzst, decode_png, encode_dzst
from shards.ingest import ingest, parse_size
from shards.synth import synthesize

FORMS = ("png", "delta-zstd", "delta-rice")
PATHS = ("cpu", "device")
SCREEN_FIELDS = ("tex", "avg_tex", "mask", "aligned_verts", "M", "view", "cam", "exp", "frame", "cam_idx",
                 "photo", "uvs", "vert_ids", "uv_ids")  # fmt: skip
NO_SCREEN_FIELDS = SCREEN_FIELDS[:10]


# ----------------------------------------------------------------------------------------- data
def _add_noise(path: Path, sigma: float, seed: int) -> None:
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    rng = np.random.default_rng(seed)
    noisy = pixels.astype(np.int16) + np.rint(rng.normal(0.0, sigma, pixels.shape)).astype(np.int16)
    noisy = np.clip(noisy, 0, 255).astype(np.uint8)
    noisy[pixels == 0] = 0  # unseen texels stay unseen
    ok, data = cv2.imencode(".png", noisy, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    assert ok
    path.write_bytes(data.tobytes())


def build_entity(
    base: Path, frames: int, cameras: int, photo: str, tex: int, noise: float, workers: int
) -> Path:
    entity = synthesize(base, expressions=1, frames=2, cameras=cameras, photo_size=photo, tex_size=tex,
                        seed=11, workers=workers)  # fmt: skip
    expression = (entity / "frame_list.txt").read_text().split()[0]
    images = sorted((entity / "images" / expression).rglob("*.png"))
    images += sorted((entity / "unwrapped_uv_1024" / expression).rglob("*.png"))
    if noise > 0:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda item: _add_noise(item[1], noise, item[0]), enumerate(images)))
    replicate_frames(entity, frames)
    return entity


# ---------------------------------------------------------------------------------------- codec
def _median_ms(function, repeats: int = 7) -> float:
    function()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        function()
        times.append(time.perf_counter() - began)
    return 1000.0 * float(np.median(times))


def _sample_images(entity: Path) -> tuple[tuple[str, Path], tuple[str, Path]]:
    """One photo and one per-view texture of the entity's first expression."""
    expression = next((entity / "images").iterdir()).name
    photo = sorted((entity / "images" / expression).rglob("*.png"))[0]
    texture = sorted(
        p for p in (entity / "unwrapped_uv_1024" / expression).rglob("*.png") if "average" not in str(p)
    )[0]
    return ("photo", photo), ("texture", texture)


def codec_rows(entity: Path, noise: float) -> list[str]:
    from PIL import Image

    cv2.setNumThreads(1)
    rows = []
    for kind, path in _sample_images(entity):
        data = path.read_bytes()
        pixels = decode_png(data, str(path))
        encoded = encode_dzst(pixels)
        pil = _median_ms(lambda data=data: np.asarray(Image.open(io.BytesIO(data))))
        ocv = _median_ms(lambda data=data: decode_png(data, "png"))
        fast = _median_ms(lambda encoded=encoded: decode_dzst(encoded, "dzst"))
        encode = _median_ms(lambda pixels=pixels: encode_dzst(pixels), 3)
        shape = "x".join(str(side) for side in pixels.shape[:2])
        rows.append(
            f"| {kind} {shape}, noise {noise:g} | {len(data) / 1e6:.2f} | {pil:.1f} | {ocv:.1f} | "
            f"{len(encoded) / 1e6:.2f} | {fast:.1f} | {encode:.0f} | {min(pil, ocv) / fast:.1f}x |"
        )
    return rows


def rice_rows(entity: Path, noise: float, device, batch: int) -> list[str]:
    """delta-rice: bytes, encode and CPU decode ms, and (CUDA) the kernel's ms for a batch, with
    delta-zstd's GPU row-filter undo of the same batch beside it (the GPU work it replaces)."""
    import torch

    from shards import rice
    from shards.codecs import packed_rice
    from trainer.gpu_decode import undo_up_filter
    from trainer.gpu_rice import decode_batch

    rows = []
    for kind, path in _sample_images(entity):
        pixels = decode_png(path.read_bytes(), str(path))
        encoded = rice.encode(pixels)
        assert np.array_equal(rice.decode(encoded, "drc"), pixels)
        encode = _median_ms(lambda pixels=pixels: rice.encode(pixels), 3)
        cpu = _median_ms(lambda encoded=encoded: rice.decode(encoded, "drc"), 3)
        gpu = undo = "-"
        if device.type == "cuda":
            slot = np.stack([packed_rice(encoded, "drc") for _ in range(batch)])
            members = torch.from_numpy(slot).to(device)
            filtered = torch.from_numpy(np.stack([pixels] * batch)).to(device)
            assert torch.equal(decode_batch(members, pixels.shape)[0].cpu(), torch.from_numpy(pixels))

            def timed(function) -> float:
                function()
                torch.cuda.synchronize()
                began = time.perf_counter()
                for _ in range(10):
                    function()
                torch.cuda.synchronize()
                return 100.0 * (time.perf_counter() - began)  # ms per call

            gpu = f"{timed(lambda members=members, shape=pixels.shape: decode_batch(members, shape)):.2f}"
            undo = f"{timed(lambda filtered=filtered: undo_up_filter(filtered)):.2f}"
        shape = "x".join(str(side) for side in pixels.shape[:2])
        rows.append(
            f"| {kind} {shape}, noise {noise:g} | {len(encoded) / 1e6:.2f} | {encode:.0f} | {cpu:.0f} | "
            f"{gpu} | {undo} |"
        )
    return rows


# ---------------------------------------------------------------------------------- the service
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def data_service(shard_root: Path, data_root: Path, log: Path, workers: int = 1):
    """Yield (base URL, server pid) of ``multiface serve`` on a free loopback port, no auth."""
    port = _free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("MULTIFACE_")}
    command = [sys.executable, "-m", "shards.cli", "serve", "--data-root", str(data_root), "--shard-root",
               str(shard_root), "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]  # fmt: skip
    with open(log, "w") as handle:
        server = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/v1/health", timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the data service did not start; see {log}") from None
                time.sleep(0.2)
        yield base, server.pid
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def service_available() -> str | None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        return f"the data service cannot start here ({error}); install the 'data' extra"
    return None


# --------------------------------------------------------------------------------------- loader
_TICK = os.sysconf("SC_CLK_TCK")


def _with_children(pid: int) -> list[int]:
    """``pid`` and its descendants (a data service with --workers > 1 forks its workers)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
    return found


def cpu_seconds(pids) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


def _peak_rss_mb(pids) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total / 1024


class Loader:
    """A DataLoader over a ShardStream, as trainer.loop builds it, plus the per-batch finish."""

    def __init__(self, location, form, path, workers, args, device, fields, tex_size=1024, kind="processes"):
        import torch

        from trainer.data import ShardSource, ShardStream, Split, select_shards
        from trainer.gpu_decode import TextureStatistics

        self.torch, self.device, self.path, self.tex_size = torch, device, path, tex_size
        source = ShardSource(location)
        stored = (source.manifest.image_codec, source.manifest.photo_shards)
        assert stored == (_codec(form), form.endswith("+photos")), (stored, form)
        self.manifest = source.manifest
        split = Split()
        shards, count = select_shards(source.manifest, split, "train")
        stream = ShardStream(source, shards, count, split, "train", 0, 1, tex_size, fields, seed=0,
                             shuffle_buffer=args.shuffle_buffer, device_finish=path == "device")  # fmt: skip
        self.stats = TextureStatistics.build(source.metadata(), device) if path == "device" else None
        self.ring = kind == "ring" and workers > 0
        if self.ring:
            from trainer.feeder import RingBatches

            finish = self._finish if self.stats is not None else None
            self.loader = RingBatches(
                stream, args.batch, workers, device, prefetch=args.prefetch, finish=finish
            )
        else:
            self.loader = torch.utils.data.DataLoader(
                stream, batch_size=args.batch, num_workers=workers, pin_memory=device.type == "cuda",
                prefetch_factor=args.prefetch if workers > 0 else None,
            )  # fmt: skip
        self.iterator = iter(self.loader)

    def _finish(self, batch: dict) -> dict:
        from trainer.gpu_decode import finish_on_device

        return finish_on_device(batch, self.stats, self.tex_size) if self.device.type == "cuda" else batch

    def next(self) -> dict:
        """The next batch as trainer.loop takes it (the ring copies and finishes it one batch ahead)."""
        from trainer.step import to_device

        batch = next(self.iterator)
        if self.ring:
            return batch
        if self.device.type == "cuda":
            batch = to_device(batch, self.device)
        return self._finish(batch) if self.stats is not None else batch

    def pids(self) -> list[int]:
        inner = self.loader._iterator if self.ring else self.iterator
        return [os.getpid()] + [worker.pid for worker in getattr(inner, "_workers", [])]

    def close(self) -> None:
        if self.ring:
            self.loader.close()
        del self.iterator


def _codec(form: str) -> str:
    """The image codec of a ``--forms`` entry (``delta-rice+photos`` -> ``delta-rice``)."""
    return form.removesuffix("+photos")


def _wire_mb(manifest, fields) -> float:
    """Bytes a run with ``fields`` downloads per sample: shards, and photo shards if it reads photos."""
    photos = "photo" in fields
    total = sum(s.bytes + (s.photos.bytes if photos and s.photos else 0) for s in manifest.shards)
    return total / max(1, manifest.num_samples) / 1e6


def measure_loader(
    location, form, path, workers, args, device, server_pid=None, kind="processes", fields=None
) -> dict:
    fields = fields or SCREEN_FIELDS
    loader = Loader(location, form, path, workers, args, device, fields, kind=kind)
    for _ in range(max(1, workers)):  # the first round: start-up, first shard, shuffle buffer
        loader.next()
    if device.type == "cuda":
        loader.torch.cuda.synchronize()
    pids = loader.pids()
    server = _with_children(server_pid) if server_pid else []
    cpu0, server0, began = cpu_seconds(pids), cpu_seconds(server), time.perf_counter()
    batches = 0
    while batches < max(3, 2 * workers) or time.perf_counter() - began < args.seconds:
        loader.next()
        batches += 1
    if device.type == "cuda":
        loader.torch.cuda.synchronize()
    elapsed = time.perf_counter() - began
    samples = batches * args.batch
    result = {
        "samples_per_s": samples / elapsed,
        "cpu_ms": 1000 * (cpu_seconds(pids) - cpu0) / samples,
        "server_cpu_ms": 1000 * (cpu_seconds(server) - server0) / samples if server else None,
        "wire_mb": _wire_mb(loader.manifest, fields),
        "rss_mb": _peak_rss_mb(pids[1:]),
        "samples": samples,
    }
    loader.close()
    return result


# ---------------------------------------------------------------------------------------- train


class Step:
    """trainer.loop's training step on one GPU: forward + losses, backward, clip, both Adams."""

    def __init__(self, meta, device, screen: bool, tex_size: int = 1024):
        import torch

        from trainer.models import build_model
        from trainer.speed import SpeedOptions, apply_speedups
        from trainer.step import Statistics

        self.torch = torch
        torch.manual_seed(0)
        self.model = build_model("base", tex_size, 21918, 256, len(meta.cameras)).to(device)
        self.speed = apply_speedups(self.model, SpeedOptions(), device)  # the trainer's defaults
        self.optimizer = torch.optim.Adam(self.model.get_model_params(), 3e-4, (0.9, 0.999))
        self.optimizer_cc = torch.optim.Adam(self.model.get_cc_params(), 3e-4, (0.9, 0.999))
        self.stats = Statistics.build(meta, tex_size, device)
        self.renderer = None
        if screen:
            from trainer.render import Renderer

            self.renderer = Renderer(device)
        self.weights = {"lambda_verts": 1.0, "lambda_tex": 1.0, "lambda_screen": 1.0 if screen else 0.0,
                        "lambda_kl": 1e-2}  # fmt: skip

    def __call__(self, batch: dict) -> None:
        from trainer.step import read_losses, run_net

        losses, _ = run_net(self.model, batch, self.stats, arch="base", weights=self.weights,
                            renderer=self.renderer, resolution=(2048, 1334),
                            screen_loss=self.speed.screen_loss)  # fmt: skip
        read_losses(losses)  # trainer.loop reads them every step (loss-spike check)
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_cc.zero_grad(set_to_none=True)
        losses["total_loss"].backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10)
        self.optimizer.step()
        self.optimizer_cc.step()


def timed_steps(step: Step, next_batch, warmup: int, steps: int, batch_size: int) -> dict:
    torch = step.torch
    for _ in range(warmup):
        step(next_batch())
    torch.cuda.synchronize()
    events = []
    waited, cpu_began = 0.0, time.thread_time()
    began = time.perf_counter()
    for _ in range(steps):
        asked = time.perf_counter()
        batch = next_batch()
        waited += time.perf_counter() - asked
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(batch)
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - began
    busy = sum(start.elapsed_time(end) for start, end in events) / 1000.0
    return {
        "samples_per_s": steps * batch_size / elapsed,
        "busy": busy / elapsed,
        "wait_ms": 1000 * waited / steps,  # in next_batch: receiving, copy and finish launches, waiting
        "main_cpu_ms": 1000 * (time.thread_time() - cpu_began) / steps,  # the training thread's CPU
    }


def _constant(batch: dict):
    return lambda: batch


def _main_core() -> set[int]:
    """The logical CPUs of the core this process runs on first (CPU 0's hyperthread siblings)."""
    siblings = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")
    text = siblings.read_text().strip() if siblings.is_file() else "0"
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


@contextlib.contextmanager
def _own_core(enabled: bool, server_pids: list[int]):
    """With ``enabled``: the training process alone on one core, workers and server elsewhere.

    The workers inherit the process's affinity when they start (at the block's first batch),
    so the process first takes the other CPUs, then moves to its own core once the workers
    run (``moved()``).
    """
    everything = os.sched_getaffinity(0)
    if not enabled:
        yield lambda: None
        return
    mine = _main_core() & everything
    rest = everything - mine
    for pid in server_pids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, rest)
    os.sched_setaffinity(0, rest)
    try:
        yield lambda: os.sched_setaffinity(0, mine)
    finally:
        os.sched_setaffinity(0, everything)
        for pid in server_pids:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, everything)


def train_rows(locations, args, device, servers: dict) -> list[str]:
    import torch

    from shards.decode import EntityMetadata

    rows = []
    for screen in (True, False):
        fields = SCREEN_FIELDS if screen else NO_SCREEN_FIELDS
        first = locations[(args.forms[0], "local")]  # the ceiling's batch: any form decodes alike
        meta = EntityMetadata.from_shard_folder(Path(first))
        step = Step(meta, device, screen)
        loader = Loader(first, args.forms[0], "device", 0, args, device, fields)
        fixed = _constant(loader.next())
        loader.close()
        # The ceiling before and after the streaming rows (it moves by 10-20% between runs on a
        # shared host); each ratio is against the higher of the two.
        before = timed_steps(step, fixed, args.warmup, args.steps, args.batch)
        streaming = []
        for form, path, kind, workers, placement in itertools.product(
            args.forms, args.paths, args.loaders, args.train_workers, args.placement
        ):
            source = "http" if (form, "http") in locations else "local"
            label = f"| {'on' if screen else 'off'} | streaming: {form}, {path} normalise, {source}, {workers} {kind}"
            label += ", training process on its own core" if placement == "own-core" else ""
            server_pids = _with_children(servers[form]) if source == "http" and form in servers else []
            try:
                with _own_core(placement == "own-core", server_pids) as moved:
                    stream = Loader(
                        locations[(form, source)], form, path, workers, args, device, fields, kind=kind
                    )
                    stream.next()  # the workers start here (and inherit this process's CPUs)
                    moved()
                    result = timed_steps(step, stream.next, workers + args.warmup, args.steps, args.batch)
                    stream.close()
            except (RuntimeError, OSError) as error:  # e.g. a worker killed: /dev/shm or RAM too small
                streaming.append((label, f"failed: {str(error)[:160]} | - | - | - | - | - |", None))
            else:
                streaming.append((label, f"{form}/{path}", result))
            print(label, streaming[-1][2], flush=True)
        after = timed_steps(step, fixed, args.warmup, args.steps, args.batch)
        del fixed
        ceiling = max(before["samples_per_s"], after["samples_per_s"])
        for name, measured in (("before", before), ("after", after)):
            rows.append(f"| {'on' if screen else 'off'} | ceiling ({name}): one batch kept on the GPU | - | "
                        f"{measured['samples_per_s']:.0f} | {measured['samples_per_s'] / ceiling:.2f} | "
                        f"{measured['busy']:.2f} | {measured['wait_ms']:.1f} | {measured['main_cpu_ms']:.1f} |")  # fmt: skip
        for label, what, result in streaming:
            if result is None:
                rows.append(f"{label} | {what}")
            else:
                rows.append(f"{label} | {what} | {result['samples_per_s']:.0f} | "
                            f"{result['samples_per_s'] / ceiling:.2f} | {result['busy']:.2f} | "
                            f"{result['wait_ms']:.1f} | {result['main_cpu_ms']:.1f} |")  # fmt: skip
        print("\n".join(rows[-2 - len(streaming) :]), flush=True)
        del step
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------- main
def _machine(device) -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        "?",
    )
    card = "no GPU"
    if device.type == "cuda":
        import torch

        card = torch.cuda.get_device_name(device)
    import torch

    return f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), {card}, torch {torch.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda adds the trainer part")
    parser.add_argument(
        "--workers", default=None, help="DataLoader worker counts, e.g. 1,4,8,16 (default 1,2)"
    )
    parser.add_argument(
        "--parts", default=None, help="codec,loader,train (default: all that the device allows)"
    )
    parser.add_argument(
        "--forms",
        default=",".join(FORMS),
        help="stored forms: png,delta-zstd,delta-rice; +photos ingests with --photo-shards (delta-rice+photos)",
    )
    parser.add_argument(
        "--loader-fields",
        default="screen",
        help="loader part: screen (the screen-loss fields) and/or no-screen (without the photo)",
    )
    parser.add_argument(
        "--paths", default=",".join(PATHS), help="cpu (decode_sample) and/or device (finish_on_device)"
    )
    parser.add_argument("--sources", default="local,http", help="local folder and/or the data service")
    parser.add_argument(
        "--server-workers", type=int, default=1, help="uvicorn worker processes of the data service"
    )
    parser.add_argument("--frames", type=int, default=8, help="frames (2 synthesised, copied to this many)")
    parser.add_argument("--cameras", type=int, default=8)
    parser.add_argument(
        "--noise", type=float, default=3.0, help="grey levels of Gaussian noise on every image"
    )
    parser.add_argument("--shard-size", type=parse_size, default=parse_size("64MB"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--prefetch", type=int, default=2, help="DataLoader prefetch_factor (trainer.loop uses 4)"
    )
    parser.add_argument("--shuffle-buffer", type=int, default=32, help="samples per worker")
    parser.add_argument("--seconds", type=float, default=8.0, help="least time per loader measurement")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per measurement")
    parser.add_argument(
        "--loaders",
        default="processes",
        help="processes (DataLoader, pin_memory) and/or ring (trainer.feeder.RingBatches), e.g. processes,ring",
    )
    parser.add_argument(
        "--train-workers",
        default=None,
        help="DataLoader worker counts of the streaming trainer rows, e.g. 12,16 (default: the most of --workers)",
    )
    parser.add_argument(
        "--placement",
        default="shared",
        help="trainer rows: shared (any process on any CPU) and/or own-core (the training process alone "
        "on CPU 0's core, workers and server on the others), e.g. shared,own-core",
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--smoke", action="store_true", help="small images and short runs: checks the harness"
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="work folder, reused if it holds data (default: temp)"
    )
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("results_input.md"))
    args = parser.parse_args()

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.smoke:
        args.workers = args.workers or "1"
    args.workers = [
        int(n) for n in (args.workers or ("1,2" if device.type == "cpu" else "1,4,8,16")).split(",")
    ]
    args.train_workers = (
        [int(n) for n in args.train_workers.split(",")] if args.train_workers else [max(args.workers)]
    )
    args.loaders = [kind for kind in args.loaders.split(",") if kind]
    args.placement = [placement for placement in args.placement.split(",") if placement]
    if unknown := set(args.placement) - {"shared", "own-core"}:
        parser.error(f"--placement {','.join(sorted(unknown))}: expected shared and/or own-core")
    if unknown := set(args.loaders) - {"processes", "ring"}:
        parser.error(f"--loaders {','.join(sorted(unknown))}: expected processes and/or ring")
    args.forms = [form for form in args.forms.split(",") if form]
    if unknown := {_codec(form) for form in args.forms} - set(FORMS):
        parser.error(f"--forms {','.join(sorted(unknown))}: expected some of {','.join(FORMS)} (+photos)")
    args.loader_fields = [name for name in args.loader_fields.split(",") if name]
    if unknown := set(args.loader_fields) - {"screen", "no-screen"}:
        parser.error(f"--loader-fields {','.join(sorted(unknown))}: expected screen and/or no-screen")
    args.paths = [path for path in args.paths.split(",") if path]
    parts = set(
        (args.parts or ("codec,loader,train" if device.type == "cuda" else "codec,loader")).split(",")
    )
    photo, tex = ("2048x1334", 1024)
    if args.smoke:
        photo, tex = ("256x168", 256)
        args.frames, args.cameras, args.seconds, args.steps, args.batch, args.noise = 4, 2, 0.2, 3, 4, 0.0
    notes = []
    sources = [source for source in args.sources.split(",") if source]
    if "http" in sources and (why := service_available()):
        sources.remove("http")
        notes.append(why)

    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-input-"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    raw = work / "raw"
    entity = next(raw.glob("m--*"), None) if raw.is_dir() else None
    if entity is None:
        entity = build_entity(raw, args.frames, args.cameras, photo, tex, args.noise, os.cpu_count() or 1)
    print(f"entity ready in {time.monotonic() - began:.0f} s: {entity}", file=sys.stderr, flush=True)
    folders = {}
    for form in args.forms:
        root = work / f"shards-{form}"
        if not (root / entity.name / "manifest.json").is_file():
            started = time.monotonic()
            ingest(entity, root, shard_size=args.shard_size, image_codec=_codec(form),
                   photo_shards=form.endswith("+photos"))  # fmt: skip
            print(f"ingest {form}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        folders[form] = root

    command = "python bench/bench_input.py " + " ".join(sys.argv[1:])
    lines = [f"## Input pipeline, {time.strftime('%Y-%m-%d')}", "", f"- machine: {_machine(device)}",
             f"- command: `{command}`", f"- data: {args.frames} frames x {args.cameras} cameras, photo {photo}, "
             f"texture {tex}, noise sigma {args.noise:g}; batch {args.batch}, prefetch_factor {args.prefetch}, "
             f"shuffle buffer {args.shuffle_buffer}/worker, shard size {args.shard_size / 1e6:.0f} MB"]  # fmt: skip
    lines += [f"- note: {note}" for note in notes]

    if "codec" in parts:
        lines += ["", "### Decode one image, one core (median of 7)", "",
                  "| image | PNG MB | PNG ms (Pillow) | PNG ms (OpenCV) | delta-zstd MB | delta-zstd ms | "
                  "delta-zstd encode ms | speed-up |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += codec_rows(entity, args.noise)
        print("\n".join(lines[-4:]), flush=True)
        if "delta-rice" in map(_codec, args.forms):
            lines += ["", f"### delta-rice: size, CPU encode and decode (one core), GPU decode of a batch of {args.batch}",
                      "", "| image | delta-rice MB | encode ms | CPU decode ms (numpy) | GPU decode ms / batch | "
                      "delta-zstd GPU row-filter undo ms / batch |", "|---|---|---|---|---|---|"]  # fmt: skip
            lines += rice_rows(entity, args.noise, device, args.batch)
            print("\n".join(lines[-4:]), flush=True)

    locations = {}
    with contextlib.ExitStack() as stack:
        servers = {}
        for form in args.forms:
            locations[(form, "local")] = str(folders[form] / entity.name)
            if "http" in sources:
                base, pid = stack.enter_context(
                    data_service(folders[form], raw, work / f"serve-{form}.log", args.server_workers)
                )
                locations[(form, "http")] = f"{base}/api/v1/entities/{entity.name}/manifest.json"
                servers[form] = pid
        if "loader" in parts:
            lines += ["", "### Loader alone: decoded samples/s (batches "
                      + ("on the GPU" if device.type == "cuda" else "in host memory") + ")", "",
                      "| form | fields | normalise on | source | workers | samples/s | loader CPU ms/sample | "
                      "server CPU ms/sample | wire MB/sample | workers' peak RSS MB |",
                      "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for form, field_set in itertools.product(args.forms, args.loader_fields):
                fields = SCREEN_FIELDS if field_set == "screen" else NO_SCREEN_FIELDS
                for path in args.paths:
                    for source in sources:
                        for kind, workers in itertools.product(args.loaders, args.workers):
                            try:
                                result = measure_loader(locations[(form, source)], form, path, workers, args,
                                                        device, servers.get(form) if source == "http" else None,
                                                        kind, fields)  # fmt: skip
                            except (
                                RuntimeError,
                                OSError,
                            ) as error:  # a worker killed: /dev/shm or RAM too small
                                lines.append(f"| {form} | {field_set} | {path} | {source} | {workers} {kind} | failed: "
                                             f"{str(error)[:160]} | | | | |")  # fmt: skip
                                print(lines[-1], flush=True)
                                continue
                            server_ms = (
                                f"{result['server_cpu_ms']:.1f}"
                                if result["server_cpu_ms"] is not None
                                else "-"
                            )
                            lines.append(
                                f"| {form} | {field_set} | {'GPU' if path == 'device' else 'CPU'} | {source} | "
                                f"{workers} {kind} | "
                                f"{result['samples_per_s']:.1f} | {result['cpu_ms']:.0f} | {server_ms} | "
                                f"{result['wire_mb']:.2f} | {result['rss_mb']:.0f} |"
                            )
                            print(lines[-1], flush=True)
        if "train" in parts and device.type == "cuda":
            lines += ["", f"### Trainer on the GPU: base, tex 1024, batch {args.batch}, {args.steps} timed steps", "",
                      "| screen loss | fed by | form/path | samples/s | / ceiling | GPU busy | "
                      "next batch ms/step | training thread CPU ms/step |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
            lines += train_rows(locations, args, device, servers)
    lines.append(f"\n(total {time.monotonic() - began:.0f} s)\n")
    text = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "a") as handle:
        handle.write(text)
    print(text)
    print(json.dumps({"output": str(args.output)}), file=sys.stderr)
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
