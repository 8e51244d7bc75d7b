"""Benchmark training steps per architecture: the reference configuration against ours.

One process, one card, synthetic batches already on the device (the input pipeline is measured
elsewhere), at the reference defaults: batch 16, texture 1024, latent 256, mesh 21918 (the
synthetic head's 7306 vertices), 38 cameras, screen loss at 2048 x 1334 on and off.

* **reference**: what the seed does on this PyTorch: fp32 without TF32 (cuDNN's TF32 default
  turned off too), eager, no cuDNN autotuning, the screen image and its weight mask rendered by
  two separate rasterisations, forward -> losses -> zero_grad -> backward -> clip 10 -> two
  Adam steps (PyTorch's default, non-fused Adam).
* **candidates**: each speed-up of :mod:`trainer.speed` alone on top of the reference, with
  the loss values of a few training steps from the same weights and batches compared to the
  reference's (and to the spread between two sampling seeds, the training noise) and the
  eval-mode forward compared to the reference's.
* **ours**: the trainer's step (``trainer.step.run_net``: one rasterisation for image and mask)
  with ``--ours`` (default: TF32, the trainer's default :class:`trainer.speed.SpeedOptions`;
  ``auto`` takes every eager candidate that was faster and kept the loss values); then
  ``torch.compile`` variants of it on one architecture, and the fastest that keeps the loss values
  on every architecture while the time budget lasts.

Timing: warm-up steps first, then CUDA events around each of ``--steps`` steps (median
reported); peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps. Each step
reads its loss values on the host, as the training loop does for its loss-spike check.

Run on a GPU machine (results as Markdown to --out, and printed)::

    python3 bench/bench_train.py --out $OUT/bench_train.md
    python3 bench/bench_train.py --no-ablation --profile 12 \
        --compile-modes default,reduce-overhead,default+bf16+channels_last   # the next questions

CPU smoke test (no screen loss, no compile; checks the code paths only)::

    .venv/bin/python bench/bench_train.py --device cpu --steps 2 --tex-size 256
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._dynamo.config
import torch._inductor.config
from torch import nn

from shards.synth.cameras import build_rig
from shards.synth.mesh import build_topology, rest_shape
from shards.synth.motion import expression_motion, head_pose
from trainer import losses
from trainer.models import ARCHS, build_model
from trainer.speed import COMPILE_MODES, SpeedOptions, Speedups, apply_speedups
from trainer.step import LOSS_NAMES, Statistics, read_losses, run_net

NUM_CAMERAS = 38
MESH_INP_SIZE = 21918
VERTSTD_MM = 2.0
TEXSTD = 40.0


@dataclass(frozen=True)
class Variant:
    """One way of running a training step.

    Attributes:
        name: label in the tables.
        options: speed-ups (:class:`trainer.speed.SpeedOptions`).
        single_raster: the trainer's ``run_net`` (one rasterisation for image and mask) instead
            of the seed's two renders.
    """

    name: str
    options: SpeedOptions
    single_raster: bool


REFERENCE = Variant("reference", SpeedOptions.reference(), single_raster=False)
EAGER_CANDIDATES = {
    "one rasterisation": replace(REFERENCE, single_raster=True),
    "cudnn benchmark": replace(REFERENCE, options=replace(REFERENCE.options, cudnn_benchmark=True)),
    "TF32": replace(REFERENCE, options=replace(REFERENCE.options, tf32=True)),
    "channels_last": replace(REFERENCE, options=replace(REFERENCE.options, channels_last=True)),
    "fused Adam": replace(REFERENCE, options=replace(REFERENCE.options, fused_adam=True)),
    "bf16 autocast": replace(REFERENCE, options=replace(REFERENCE.options, bf16=True)),
}
CUDA_ONLY = ("cudnn benchmark", "TF32", "fused Adam", "bf16 autocast")
OPTION_OF = {
    "cudnn benchmark": "cudnn_benchmark",
    "TF32": "tf32",
    "channels_last": "channels_last",
    "fused Adam": "fused_adam",
    "bf16 autocast": "bf16",
}


# --------------------------------------------------------------------------- synthetic data


@dataclass
class Scene:
    """Device-resident statistics and rotating batches for one (tex size, resolution)."""

    stats: Statistics
    batches: list[dict]
    resolution: tuple[int, int]


def build_scene(args: argparse.Namespace, device: torch.device, screen: bool, seed: int = 0) -> Scene:
    """Statistics and ``--num-batches`` random batches of the reference fields' shapes.

    Geometry is real: the synthetic head's topology and rest shape as ``vertmean``, and 16
    cameras of the synthetic rig around a moving head, so the screen render covers a realistic
    share of each 2048 x 1334 image. Textures, photos and masks are random.
    """
    rows, cols = args.resolution
    topology = build_topology()
    rest = rest_shape(topology, np.random.default_rng([seed, 2]).uniform(-1.0, 1.0, 4)).astype(np.float32)
    cameras = build_rig(seed, max(args.batch_size, 2), rows, cols)
    motion = expression_motion(seed, 0, "E057_Cheeks_Puffed")
    size, n = args.tex_size, args.batch_size
    generator = torch.Generator().manual_seed(seed)
    stats = Statistics(
        texmean=(torch.rand(1, 3, size, size, generator=generator) * 255.0).to(device),
        texstd=TEXSTD,
        vertmean=torch.from_numpy(rest).view(1, -1, 3).to(device),
        vertstd=VERTSTD_MM,
        loss_weight=torch.ones(1, 3, size, size, device=device),
        uniform_weight=True,
    )
    batches = []
    for index in range(args.num_batches):
        matrices, views = [], []
        for item in range(n):
            camera = cameras[item % len(cameras)]
            pose = head_pose(motion, index * n + item)
            matrices.append(camera.projection(pose))
            position = pose[:, :3].T @ (camera.position - pose[:, 3])
            views.append(position / np.linalg.norm(position))
        batch = {
            "M": torch.tensor(np.stack(matrices), dtype=torch.float32),
            "view": torch.tensor(np.stack(views), dtype=torch.float32),
            "cam": torch.randint(0, NUM_CAMERAS, (n,), generator=generator),
            "tex": torch.randn(n, 3, size, size, generator=generator),
            "avg_tex": torch.randn(n, 3, size, size, generator=generator),
            "mask": (torch.rand(n, 1, size, size, generator=generator) > 0.2).float().expand(-1, 3, -1, -1),
            "aligned_verts": torch.randn(n, rest.shape[0], 3, generator=generator) * 0.5,
            "uvs": torch.tensor(topology.uvs, dtype=torch.float32),
            "vert_ids": torch.tensor(topology.vert_ids, dtype=torch.int32),
            "uv_ids": torch.tensor(topology.uv_ids, dtype=torch.int32),
        }
        if screen:
            batch["photo"] = torch.rand(n, rows, cols, 3, generator=generator)
        batches.append({key: value.contiguous().to(device) for key, value in batch.items()})
    return Scene(stats, batches, (rows, cols))


# --------------------------------------------------------------------------- one training step


def reference_values(step_losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """The seed reads each loss on the host on its own (one wait per loss)."""
    return {name: float(step_losses[name].detach()) for name in LOSS_NAMES}


def reference_forward(model, batch, stats, *, arch, weights, renderer, resolution):
    """The seed's run_net: like trainer.step.run_net, but image and mask are two full renders."""
    outputs = model(batch["avg_tex"], batch["aligned_verts"], batch["view"], cams=batch["cam"])
    if arch == "warp":
        pred_tex, pred_verts, _, _, kl = outputs
    else:
        pred_tex, pred_verts, kl = outputs
    vert_loss = losses.vert_loss(pred_verts, batch["aligned_verts"])
    pred_verts = pred_verts * stats.vertstd + stats.vertmean
    tex_loss = losses.tex_loss(pred_tex, batch["tex"], batch["mask"], stats.texmean, stats.texstd)
    pred01 = losses.texture_to_unit(pred_tex, stats.texmean, stats.texstd)
    screen = None
    if weights["lambda_screen"] > 0:
        topology = (batch["M"], pred_verts, batch["vert_ids"], batch["uvs"], batch["uv_ids"])
        image = renderer.render(*topology, pred01, resolution)
        weight = stats.loss_weight.repeat(pred01.shape[0], 1, 1, 1)
        screen_mask = renderer.render(*topology, weight, resolution)
        screen = losses.screen_loss(image, batch["photo"], screen_mask, stats.texstd)
    total = losses.total_loss(vert_loss, tex_loss, screen, kl, **weights)
    zero = torch.zeros((), device=total.device)
    return {
        "total_loss": total,
        "vert_loss": vert_loss,
        "tex_loss": tex_loss,
        "screen_loss": screen if screen is not None else zero,
        "kl": kl,
    }


class Runner:
    """A model, its optimisers and one variant's training step, resettable to the same start."""

    def __init__(self, setup: ArchSetup, variant: Variant, scene: Scene, screen: bool, renderer, device):
        self.setup, self.variant, self.scene, self.device = setup, variant, scene, device
        self.arch = setup.arch
        self.weights = {"lambda_verts": 1.0, "lambda_tex": 1.0, "lambda_screen": 1.0 if screen else 0.0}
        self.weights["lambda_kl"] = 0.01
        self.renderer = renderer
        model = setup.model
        model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
        self.speed: Speedups = apply_speedups(model, variant.options, device)
        self.module = setup.training_module(self.speed)
        self.reset()

    def reset(self) -> None:
        model: Any = self.setup.model  # DeepAppearanceVAE or WarpFieldVAE
        model.load_state_dict(self.setup.init_state)
        model.train()
        lr, betas, extra = 3e-4, (0.9, 0.999), self.speed.adam_kwargs
        self.optimizer = torch.optim.Adam(model.get_model_params(), lr, betas, **extra)
        self.optimizer_cc = torch.optim.Adam(model.get_cc_params(), lr, betas, **extra)

    def step(self, batch: dict) -> dict[str, float]:
        common = {"arch": self.arch, "weights": self.weights, "renderer": self.renderer}
        common["resolution"] = self.scene.resolution
        if self.variant.single_raster:
            result = run_net(
                self.module, batch, self.scene.stats, screen_loss=self.speed.screen_loss, **common
            )
        else:
            result = reference_forward(self.module, batch, self.scene.stats, **common)
        step_losses = result[0] if isinstance(result, tuple) else result
        # Read on the host every step, as the training loop does for its loss-spike check.
        values = read_losses(step_losses) if self.variant.single_raster else reference_values(step_losses)
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_cc.zero_grad(set_to_none=True)
        step_losses["total_loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.setup.model.parameters(), 10)
        self.optimizer.step()
        self.optimizer_cc.step()
        return values

    def eval_output(self, batch: dict) -> torch.Tensor:
        """Eval-mode texture and mesh of the plain model at the initial weights (as validation
        sees the model: no compile, no autocast), under eval precision."""
        self.reset()
        model = self.setup.model
        model.eval()
        with torch.no_grad(), self.speed.eval_precision():
            out = model(
                batch["avg_tex"], batch["aligned_verts"], batch["view"], cams=batch["cam"], sample=False
            )
        model.train()
        return torch.cat([out[0].flatten(), out[1].flatten()]).double()


@dataclass
class ArchSetup:
    """One architecture's model (shared by all variants), its initial weights and compiled forms."""

    arch: str
    model: nn.Module
    init_state: dict
    compiled: dict = dataclasses.field(default_factory=dict)
    compile_seconds: dict = dataclasses.field(default_factory=dict)

    def training_module(self, speed: Speedups) -> nn.Module:
        options = speed.options
        if options.compile_mode is None:
            return speed.training_module(self.model)
        key = (options.compile_mode, options.bf16, options.channels_last)
        if key not in self.compiled:
            self.compiled[key] = speed.training_module(self.model)
        return self.compiled[key]


def build_setup(arch: str, args: argparse.Namespace, device: torch.device) -> ArchSetup:
    torch.manual_seed(0)
    model = build_model(arch, args.tex_size, MESH_INP_SIZE, args.nlatent, NUM_CAMERAS).to(device)
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    return ArchSetup(arch, model, state)


# --------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    ms_per_step: float
    ms_runs: list[float]
    samples_per_s: float
    peak_gib: float | None
    first_step_s: float


def time_runner(runner: Runner, args: argparse.Namespace) -> Timing:
    device, batches = runner.device, runner.scene.batches
    runner.reset()
    start = time.perf_counter()
    runner.step(batches[0])
    synchronize(device)
    first = time.perf_counter() - start
    for index in range(1, args.warmup):
        runner.step(batches[index % len(batches)])
    synchronize(device)
    runs = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(args.steps)
        ]
        for index, (begin, end) in enumerate(events):
            begin.record()
            runner.step(batches[index % len(batches)])
            end.record()
        torch.cuda.synchronize(device)
        runs = [begin.elapsed_time(end) for begin, end in events]
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        for index in range(args.steps):
            begin_s = time.perf_counter()
            runner.step(batches[index % len(batches)])
            runs.append((time.perf_counter() - begin_s) * 1e3)
        peak = None
    ms = statistics.median(runs)
    return Timing(ms, runs, args.batch_size * 1e3 / ms, peak, first)


def gpu_busy(runner: Runner, steps: int = 2) -> str:
    """Share of wall time the GPU spends in kernels over ``steps`` steps (the most CUDA graphs
    could save is the rest), from the PyTorch profiler's CUDA activity."""
    from torch.profiler import ProfilerActivity, profile

    batches = runner.scene.batches
    runner.step(batches[0])
    synchronize(runner.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for index in range(steps):
            runner.step(batches[index % len(batches)])
        synchronize(runner.device)
        wall_us = (time.perf_counter() - start) * 1e6
    busy_us, kernels = 0.0, 0
    for item in prof.key_averages():
        busy_us += float(getattr(item, "self_device_time_total", getattr(item, "self_cuda_time_total", 0.0)))
        kernels += int(item.count)
    return (
        f"GPU busy {100 * busy_us / wall_us:.0f}% of the wall time of {steps} steps of {runner.variant.name} "
        f"({runner.arch}, {kernels / steps:.0f} kernels and copies per step, profiler on): CUDA graphs could "
        f"save at most the idle {max(0.0, 100 - 100 * busy_us / wall_us):.0f}%, and the step reads its losses "
        "on the host (spike check) and nvdiffrast allocates its outputs, so they were not tried."
    )


def top_kernels(runner: Runner, count: int, steps: int = 2) -> str:
    """Markdown table of the ``count`` CUDA kernels with the most device time over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    batches = runner.scene.batches
    runner.step(batches[0])
    synchronize(runner.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for index in range(steps):
            runner.step(batches[index % len(batches)])
        synchronize(runner.device)
    rows = []
    for item in prof.key_averages():
        total = float(getattr(item, "self_device_time_total", getattr(item, "self_cuda_time_total", 0.0)))
        rows.append((total, int(item.count), item.key))
    rows.sort(reverse=True)
    whole = sum(row[0] for row in rows) or 1.0
    lines = [
        f"Costliest CUDA kernels per step, {runner.variant.name} ({runner.arch}), profiler on, "
        f"{whole / steps / 1e3:.1f} ms of kernels per step:",
        "",
        "| kernel | ms/step | share | calls/step |",
        "|---|---|---|---|",
    ]
    for total, calls, key in rows[:count]:
        name = key.replace("|", "/")
        name = name if len(name) <= 90 else name[:87] + "..."
        lines.append(
            f"| `{name}` | {total / steps / 1e3:.2f} | {100 * total / whole:.1f}% | {calls / steps:.0f} |"
        )
    return "\n".join(lines)


def loss_trace(runner: Runner, steps: int, seed: int) -> list[dict[str, float]]:
    """Loss values of ``steps`` training steps from the initial weights, z drawn with ``seed``."""
    runner.reset()
    torch.manual_seed(seed)
    batches = runner.scene.batches
    return [runner.step(batches[index % len(batches)]) for index in range(steps)]


def max_relative_delta(trace: list[dict[str, float]], baseline: list[dict[str, float]]) -> float:
    worst = 0.0
    for values, base in zip(trace, baseline, strict=True):
        for name in LOSS_NAMES:
            a, b = values[name], base[name]
            if not (math.isfinite(a) and math.isfinite(b)):
                return math.inf
            if b == 0.0 and a == 0.0:
                continue
            worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
    return worst


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


@dataclass
class Check:
    loss_delta: float
    eval_delta: float
    verdict: str


def classify(loss_delta: float, repeat_noise: float, sampling_noise: float) -> str:
    """'identical' (fp32 rounding), 'within noise' (<10% of the seed-to-seed spread), 'changes'."""
    if loss_delta <= max(1e-5, 2 * repeat_noise):
        return "identical"
    if loss_delta <= 0.1 * sampling_noise:
        return "within noise"
    return "changes losses"


# --------------------------------------------------------------------------- report


class Report:
    def __init__(self, args: argparse.Namespace, device: torch.device, command: str):
        self.args, self.device, self.command = args, device, command
        self.sections: list[str] = []
        self.started = time.monotonic()

    def header(self) -> str:
        args = self.args
        if self.device.type == "cuda":
            card = torch.cuda.get_device_name(self.device)
            props = torch.cuda.get_device_properties(self.device)
            card += f" ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
            versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
        else:
            card = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
            versions = f"torch {torch.__version__}"
        rows, cols = args.resolution
        return "\n".join(
            [
                "## Training step throughput (`bench/bench_train.py`)",
                "",
                f"- card: {card}; {versions}; Python {platform.python_version()}",
                f"- command: `{self.command}`",
                f"- batch {args.batch_size}, texture {args.tex_size}, latent {args.nlatent}, mesh {MESH_INP_SIZE}, "
                f"{NUM_CAMERAS} cameras, screen loss at {rows}x{cols}; synthetic batches already on the device "
                f"({args.num_batches} rotating); {args.warmup} warm-up steps, median of {args.steps} timed steps "
                f"({'CUDA events' if self.device.type == 'cuda' else 'host clock'}); peak = max_memory_allocated "
                "over the timed steps; loss checks over "
                f"{args.check_steps} steps from the same weights and batches.",
            ]
        )

    def write(self) -> str:
        text = self.header() + "\n\n" + "\n\n".join(self.sections) + "\n"
        for path in (self.args.out, self.args.results):
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_text(text)
        return text

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def fmt_mem(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def fmt_delta(value: float) -> str:
    return "inf" if not math.isfinite(value) else f"{value:.1e}"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated architectures")
    parser.add_argument("--ablation-arch", default="base", help="architecture for the per-candidate table")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 (2 on the CPU)")
    parser.add_argument("--tex-size", type=int, default=1024)
    parser.add_argument("--nlatent", type=int, default=256)
    parser.add_argument("--resolution", type=int, nargs=2, default=(2048, 1334), metavar=("ROWS", "COLS"))
    parser.add_argument("--steps", type=int, default=15, help="timed steps per configuration")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="warm-up steps, compile happens in the first (default 3, 1 on CPU)",
    )
    parser.add_argument(
        "--check-steps",
        type=int,
        default=None,
        help="training steps compared for loss deltas (default 3, 2 on CPU)",
    )
    parser.add_argument("--num-batches", type=int, default=2, help="distinct batches rotated through")
    parser.add_argument(
        "--compile-modes",
        default="default",
        help="torch.compile variants of ours tried on the ablation architecture, comma-separated, each "
        "MODE[+OPTION...] (e.g. 'default,default+bf16+channels_last,reduce-overhead'); the fastest that keeps "
        "the loss values then runs on every architecture ('' for none; default none on CPU). "
        "max-autotune-no-cudagraphs did not finish autotuning base in 220 s on an H200, so it is not a default",
    )
    parser.add_argument(
        "--ours",
        default="tf32",
        help="eager speed-ups of ours besides one rasterisation: 'auto' (every candidate that was faster and "
        f"kept the losses) or a comma-separated list of {', '.join(OPTION_OF.values())} (default: tf32, the "
        "trainer's default trainer.speed.SpeedOptions)",
    )
    parser.add_argument("--no-ablation", action="store_true", help="skip the per-candidate table")
    parser.add_argument("--profile", type=int, default=0, help="list the N costliest CUDA kernels of a step")
    parser.add_argument(
        "--time-budget", type=float, default=480.0, help="seconds; later stages are skipped past it"
    )
    parser.add_argument("--out", default="", help="Markdown file for the results")
    parser.add_argument(
        "--results", default="", help="second copy of the Markdown (e.g. bench/results_train.md)"
    )
    args = parser.parse_args(argv)
    args.resolution = tuple(args.resolution)
    args.archs = [arch for arch in args.archs.split(",") if arch]
    unknown = sorted(set(args.archs + [args.ablation_arch]) - set(ARCHS))
    if unknown:
        parser.error(f"unknown architectures {unknown}; expected some of {', '.join(ARCHS)}")
    if args.device == "cpu" and "--compile-modes" not in " ".join(argv or sys.argv):
        args.compile_modes = ""
    args.compile_modes = [mode for mode in args.compile_modes.split(",") if mode]
    for spec in args.compile_modes:
        mode, *extra = spec.split("+")
        if mode not in COMPILE_MODES or not set(extra) <= set(OPTION_OF.values()):
            parser.error(f"--compile-modes {spec!r}: expected MODE[+OPTION...] with MODE in {COMPILE_MODES}")
    if args.ours != "auto":
        args.ours = [name for name in args.ours.split(",") if name]
        if not set(args.ours) <= set(OPTION_OF.values()):
            parser.error(f"--ours {args.ours}: expected 'auto' or some of {', '.join(OPTION_OF.values())}")
    cpu = args.device == "cpu"
    if args.batch_size is None:
        args.batch_size = 2 if cpu else 16
    if args.warmup is None:
        args.warmup = 1 if cpu else 3
    if args.check_steps is None:
        args.check_steps = 2 if cpu else 3
    args.warmup = max(1, args.warmup)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "--device cuda but torch sees no CUDA device; use --device cpu for the smoke test",
            file=sys.stderr,
        )
        return 2
    # Compiled code draws z with the eager generator, so loss traces are comparable with eager's.
    torch._inductor.config.fallback_random = True
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    command = "python3 bench/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = Report(args, device, command.strip())
    renderer = None
    screens = [False]
    if device.type == "cuda":
        from trainer.render import Renderer

        renderer = Renderer(device)
        screens = [True, False]
    scenes = {screen: build_scene(args, device, screen) for screen in screens}
    setups: dict[str, ArchSetup] = {}

    def setup(arch: str) -> ArchSetup:
        if arch not in setups:
            setups[arch] = build_setup(arch, args, device)
        return setups[arch]

    def measure(arch: str, variant: Variant, screen: bool) -> tuple[Runner, Timing]:
        runner = Runner(setup(arch), variant, scenes[screen], screen, renderer, device)
        timing = time_runner(runner, args)
        label = "screen" if screen else "no screen"
        print(
            f"[{report.elapsed():6.1f}s] {arch:8s} {label:9s} {variant.name:40s} {timing.ms_per_step:8.2f} ms/step "
            f"{timing.samples_per_s:7.1f} samples/s peak {fmt_mem(timing.peak_gib)} GiB first {timing.first_step_s:.1f}s",
            flush=True,
        )
        return runner, timing

    def free() -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # 1. Reference configuration, every architecture.
    reference: dict[tuple[str, bool], Timing] = {}
    for arch in args.archs:
        for screen in screens:
            _, reference[arch, screen] = measure(arch, REFERENCE, screen)
    free()

    # 2. Each candidate alone on the ablation architecture (screen loss on where there is one).
    screen = screens[0]
    arch = args.ablation_arch
    base_runner, base_timing = measure(arch, REFERENCE, screen)
    ref_trace = loss_trace(base_runner, args.check_steps, seed=0)
    repeat_noise = max_relative_delta(loss_trace(base_runner, args.check_steps, seed=0), ref_trace)
    sampling_noise = max_relative_delta(loss_trace(base_runner, args.check_steps, seed=1), ref_trace)
    ref_eval = base_runner.eval_output(scenes[screen].batches[0])
    ablation: dict[str, tuple[Timing, Check]] = {}

    def check(runner: Runner) -> Check:
        delta = max_relative_delta(loss_trace(runner, args.check_steps, seed=0), ref_trace)
        eval_delta = relative_l2(runner.eval_output(scenes[screen].batches[0]), ref_eval)
        return Check(delta, eval_delta, classify(delta, repeat_noise, sampling_noise))

    for name, variant in EAGER_CANDIDATES.items():
        if args.no_ablation:
            break
        if variant.single_raster and renderer is None:
            continue
        if device.type != "cuda" and name in CUDA_ONLY:
            continue
        try:
            runner, timing = measure(arch, replace(variant, name=name), screen)
            ablation[name] = (timing, check(runner))
        except Exception as error:  # a candidate that fails is reported, not fatal
            traceback.print_exc()
            print(f"candidate {name} failed: {error}", flush=True)
    free()

    kept = [
        name
        for name, (timing, verdict) in ablation.items()
        if verdict.verdict != "changes losses" and timing.ms_per_step < 0.98 * base_timing.ms_per_step
    ]
    if renderer is not None and "one rasterisation" not in kept:
        kept.append("one rasterisation")  # the trainer's run_net does it regardless
    if args.ours != "auto":
        names = {option: label for label, option in OPTION_OF.items()}
        kept = ["one rasterisation"] * (renderer is not None) + [names[option] for option in args.ours]
    flags: dict[str, Any] = {OPTION_OF[name]: True for name in kept if name in OPTION_OF}
    ours_options = replace(REFERENCE.options, **flags)
    ours = Variant(
        f"ours (eager: {', '.join(kept) or 'no candidate'})", ours_options, single_raster=renderer is not None
    )

    compile_rows: list[tuple[str, tuple[Timing, Check]]] = []
    notes: list[str] = []

    # 3. Ours (eager), every architecture, with its loss check on the ablation architecture.
    ours_timing: dict[tuple[str, bool], Timing] = {}
    ours_check = None
    for arch_name in args.archs:
        for screen_on in screens:
            runner, ours_timing[arch_name, screen_on] = measure(arch_name, ours, screen_on)
            if arch_name == arch and screen_on == screen:
                ours_check = check(runner)
                if device.type == "cuda" and args.profile:
                    try:
                        notes.append(top_kernels(base_runner, args.profile))
                        notes.append(top_kernels(runner, args.profile))
                    except Exception as error:
                        notes.append(f"kernel profile failed: {type(error).__name__}: {error}")
                if device.type == "cuda":
                    try:
                        notes.append(gpu_busy(runner))
                    except Exception as error:
                        notes.append(f"GPU busy share not measured: {type(error).__name__}: {error}")
    free()

    def section_tables(compiled: dict[tuple[str, bool], Timing], compile_label: str) -> None:
        lines = [
            "### Reference configuration vs ours, per architecture",
            "",
            f"Ours = {ours.name.removeprefix('ours ')}"
            + (f"; last columns add torch.compile ({compile_label})." if compiled else "."),
            "",
            "| arch | screen loss | reference ms/step | reference samples/s | reference peak GiB "
            "| ours ms/step | ours samples/s | ours peak GiB | ours / reference "
            + (
                "| ours+compile ms/step | ours+compile samples/s | peak GiB | ours+compile / reference |"
                if compiled
                else "|"
            ),
            "|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if compiled else ""),
        ]
        for arch_name in args.archs:
            for screen_on in screens:
                ref, our = reference[arch_name, screen_on], ours_timing[arch_name, screen_on]
                row = (
                    f"| {arch_name} | {'on' if screen_on else 'off'} | {ref.ms_per_step:.1f} | {ref.samples_per_s:.1f} "
                    f"| {fmt_mem(ref.peak_gib)} | {our.ms_per_step:.1f} | {our.samples_per_s:.1f} | {fmt_mem(our.peak_gib)} "
                    f"| **{ref.ms_per_step / our.ms_per_step:.2f}x** |"
                )
                if compiled:
                    timing = compiled.get((arch_name, screen_on))
                    if timing is None:
                        row += " not run (time budget) | | | |"
                    else:
                        row += (
                            f" {timing.ms_per_step:.1f} | {timing.samples_per_s:.1f} | {fmt_mem(timing.peak_gib)} "
                            f"| **{ref.ms_per_step / timing.ms_per_step:.2f}x** |"
                        )
                lines.append(row)
        report.sections = ["\n".join(lines)]
        lines = [
            f"### Each candidate alone on top of the reference ({arch}, screen loss {'on' if screen else 'off'})",
            "",
            f"Loss delta: max over {args.check_steps} training steps and the five losses of |loss - reference| / "
            f"|reference|, same initial weights, batches and z noise. Noise floors: the reference repeated "
            f"{fmt_delta(repeat_noise)} (nondeterministic atomics), another z seed {fmt_delta(sampling_noise)} "
            "(sampling noise of training). Verdict: identical (<= max(1e-5, 2x repeat)), within noise "
            "(<= 10% of the seed spread), else changes losses. Eval delta: relative L2 of the eval-mode "
            "(z = mean) texture and mesh of the plain model under `Speedups.eval_precision()` vs the reference's.",
            "",
            "| variant | ms/step | samples/s | speed-up | peak GiB | first step s | loss delta | eval delta | verdict |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| reference | {base_timing.ms_per_step:.1f} | {base_timing.samples_per_s:.1f} | 1.00x "
            f"| {fmt_mem(base_timing.peak_gib)} | {base_timing.first_step_s:.1f} | 0 | 0 | |",
        ]
        entries = list(ablation.items())
        if ours_check is not None:
            entries.append((ours.name, (ours_timing[arch, screen], ours_check)))
        entries += compile_rows
        for name, (timing, verdict) in entries:
            lines.append(
                f"| {name} | {timing.ms_per_step:.1f} | {timing.samples_per_s:.1f} "
                f"| {base_timing.ms_per_step / timing.ms_per_step:.2f}x | {fmt_mem(timing.peak_gib)} "
                f"| {timing.first_step_s:.1f} | {fmt_delta(verdict.loss_delta)} | {fmt_delta(verdict.eval_delta)} "
                f"| {verdict.verdict} |"
            )
        report.sections.append("\n".join(lines))
        report.sections += notes
        report.write()

    compiled: dict[tuple[str, bool], Timing] = {}
    compile_label = ""
    section_tables(compiled, compile_label)

    # 4. torch.compile variants of ours on the ablation architecture; the fastest that keeps the
    #    loss values then on every architecture while the time budget lasts.
    tried: list[tuple[Variant, Timing, Check]] = []
    for spec in args.compile_modes:
        remaining = args.time_budget - report.elapsed()
        if remaining < 60:
            notes.append(f"torch.compile {spec!r}: not run ({remaining:.0f} s of the time budget left).")
            continue
        mode, *extra = spec.split("+")
        options = replace(ours.options, compile_mode=mode, **dict.fromkeys(extra, True))
        label = f"ours + compile ({mode})" + "".join(f" + {name}" for name in extra)
        variant = replace(ours, name=label, options=options)
        try:
            runner, timing = measure(arch, variant, screen)
            verdict = check(runner)
        except Exception as error:
            traceback.print_exc()
            notes.append(f"torch.compile {spec!r} failed: {type(error).__name__}: {str(error)[:300]}")
            continue
        compile_rows.append((variant.name, (timing, verdict)))
        tried.append((variant, timing, verdict))
        section_tables(compiled, compile_label)
        free()
    keeping = [entry for entry in tried if entry[2].verdict != "changes losses"]
    if tried and not keeping:
        notes.append("No compile variant kept the loss values within noise; the fastest is shown anyway.")
        keeping = tried
    if keeping:
        best, best_timing, _ = min(keeping, key=lambda entry: entry[1].ms_per_step)
        compile_label = best.name.removeprefix("ours + compile ")
        compiled[arch, screen] = best_timing
        for arch_name in args.archs:
            for screen_on in screens:
                if (arch_name, screen_on) in compiled:
                    continue
                if args.time_budget - report.elapsed() < 45:
                    notes.append(f"{best.name} on {arch_name}: not run (time budget).")
                    continue
                try:
                    _, compiled[arch_name, screen_on] = measure(arch_name, best, screen_on)
                except Exception as error:
                    traceback.print_exc()
                    notes.append(f"{best.name} on {arch_name}: {type(error).__name__}: {str(error)[:200]}")
            section_tables(compiled, compile_label)
    section_tables(compiled, compile_label)
    print(report.write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
