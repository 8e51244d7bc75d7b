"""Evaluate a trained model on the test split: losses and masked PSNR per expression and overall.

    multiface test --shards URL_OR_FOLDER --model_ckpt runs/experiment/best_model.pt [--output DIR]
    torchrun --nproc_per_node=N -m trainer.evaluate --shards ... --model_ckpt ...

``--model_ckpt`` takes our run checkpoints (``checkpoint.pt`` / ``best_model.pt``: their config
supplies the split files and loss weights) or a published reference state dict (``module.``
keys; the architecture and sizes are read off its shapes, ``--arch/--nlatent/--tex_size``
override). Every test sample is read exactly once, sharded over the ranks; sums and counts are
all-reduced and rank 0 writes ``metrics.json``, ``metrics.csv`` and ``metrics.md``.

Protocols: ``mean`` (default) decodes z = posterior mean with the trained colour correction,
so two runs give the same numbers. ``seed`` is the reference test.py: Adam (``--lr``) on the
encoder and colour correction, on the test set, for 7 passes of ``--val_num`` batches, then one
pass over every test sample with z sampled, measuring each batch before its update (the
reference's passes read ``--val_num`` + 1 batches, an off-by-one not kept here). The model is
changed in memory only; the checkpoint file is never written.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import fields as dataclass_fields
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from webdataset.tariterators import group_by_keys

from shards.samples import SampleKey
from trainer.config import TrainConfig
from trainer.data import ShardSource, ShardStream, select_shards, verified_members
from trainer.distributed import DistEnv, agree_any, all_reduce_sum, init_distributed, is_distributed, shutdown
from trainer.loop import build_split, fields_for
from trainer.losses import texture_to_unit
from trainer.models import (
    DeepAppearanceVAE,
    WarpFieldVAE,
    build_model,
    infer_model_config,
    load_weights,
    strip_wrapper_prefixes,
)
from trainer.step import Statistics, run_net, to_device

Model = DeepAppearanceVAE | WarpFieldVAE
PROTOCOLS = ("mean", "seed")
SEED_FIT_PASSES = 7
"""The reference test.py runs 8 passes over the test loader; the first 7 only fit."""
SEED_VAL_NUM = 500
"""The reference's ``--val_num`` default: batches per fitting pass."""
LAMBDAS = ("lambda_verts", "lambda_tex", "lambda_screen", "lambda_kl")
PSNR_MAX_DB = 100.0
"""PSNR of a perfect prediction (the MSE is floored so the table stays finite)."""
COLUMNS = ("expression", "samples", "vert_loss", "tex_loss", "tex_loss_8bit", "screen_loss", "psnr_db")
UNITS = {
    "vert_loss": "MSE of normalised vertices ((v - vertmean) / vertstd)",
    "tex_loss": "masked MSE in 8-bit levels / texstd^2 (the reference's tex_loss)",
    "tex_loss_8bit": "tex_loss * texstd^2: masked MSE in 8-bit levels (the reference's denorm_tex_loss)",
    "screen_loss": "weighted photo MSE in 8-bit levels / texstd^2; n/a without a CUDA renderer",
    "psnr_db": "mean per-sample PSNR of the predicted vs true texture over the mask, peak 255",
}


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict | None, str | None]:
    """Read a model's weights from our run checkpoint or a published plain state dict.

    Loads with ``weights_only=True`` (no arbitrary code), allowing the numpy arrays our
    checkpoints keep their statistics in.

    Returns:
        (state dict on the CPU without ``module.`` prefixes, our run's config as a dict or
        None for a published checkpoint, the entity the run trained on or None).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"--model_ckpt {path}: no such file (a checkpoint.pt, best_model.pt or .pth)")
    # The callables numpy pickles arrays and scalars with, found without naming numpy's private modules.
    numpy_types: list[Any] = [
        np.ndarray,
        np.dtype,
        np.zeros(1).__reduce__()[0],
        np.float64(0).__reduce__()[0],
    ]
    numpy_types += [type(np.dtype(kind)) for kind in (np.float32, np.float64, np.int64, np.int32, np.uint8)]
    with torch.serialization.safe_globals(numpy_types):
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    run_config = entity = None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
        config = loaded.get("config")
        run_config = json.loads(config) if isinstance(config, str) else None
        entity = loaded.get("entity")
        loaded = loaded["model"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(
            f"--model_ckpt {path}: expected our checkpoint (a dict with 'model' and 'config') or a "
            f"published state dict (name -> tensor); got {type(loaded).__name__}"
        )
    return strip_wrapper_prefixes(loaded), run_config, entity


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[Model, TrainConfig, str | None]:
    """Build the checkpoint's model and the run settings evaluation uses.

    Precedence per setting: the flag, then our run's config, then (architecture and sizes) the
    checkpoint's shapes or (the rest) the reference defaults.

    Returns:
        (model on ``device`` in eval mode, settings, the entity the run trained on or None).
    """
    state, run_config, entity = read_checkpoint(args.model_ckpt)
    shapes = infer_model_config(state)
    values: dict = {"arch": shapes["arch"], "nlatent": shapes["n_latent"], "tex_size": shapes["tex_size"]}
    values["mesh_inp_size"] = shapes["mesh_inp_size"]
    known = {item.name for item in dataclass_fields(TrainConfig)}
    shape_names = ("arch", "nlatent", "tex_size", "mesh_inp_size")
    values.update({k: v for k, v in (run_config or {}).items() if k in known and k not in shape_names})
    values.update({k: v for k, v in vars(args).items() if k in known and v is not None})
    values.setdefault("shards", "")
    if not values["shards"]:
        raise ValueError("--shards is required for a published checkpoint (its file holds no run config)")
    settings = TrainConfig.from_dict(values)
    model = build_model(
        settings.arch, settings.tex_size, settings.mesh_inp_size, settings.nlatent, shapes["n_cams"]
    )
    load_weights(model, state)
    return cast(Model, model.to(device).eval()), settings, entity


class ShardPass(ShardStream):
    """Every sample of a split's shards exactly once, in shard order, for evaluation.

    Shards are dealt round-robin to the (rank, worker) slots, so the ranks together read each
    shard once; a rank may get none. A shard that fails its sha256 raises
    :class:`~shards.errors.IntegrityError`: numbers on a silently smaller test set would not
    compare. Arguments as :class:`ShardStream`, plus:

    Args:
        frames: keep only these expressions, and of each only these frame numbers.
    """

    def __init__(self, *args, frames: Mapping[str, Collection[str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.frames = frames

    def _wanted(self, key: SampleKey) -> bool:
        cameras = self.split.cameras(self.part)
        if not self.split.wants_expression(key.expression, self.part):
            return False
        if cameras is not None and key.camera not in cameras:
            return False
        return self.frames is None or key.frame in self.frames.get(key.expression, ())

    def __iter__(self) -> Iterator[dict]:
        if self._meta is None:
            self._meta = self.source.metadata()
        slot, num_slots = self._slot()
        streams = (self.source.open_shard(shard, self._photos) for shard in self.shards[slot::num_slots])
        for sample in group_by_keys(verified_members(streams, self._keep_member)):
            if self._wanted(SampleKey.from_key(sample["__key__"])):
                yield self.decode(sample)


def masked_psnr(pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR over the seen texels, peak 255.

    Args:
        pred: (N, 3, T, T) float predicted texture in 8-bit levels (clamped to [0, 255] here).
        true: (N, 3, T, T) float true texture in 8-bit levels.
        mask: (N, 3, T, T) float weights, 1 where the camera saw the texel (the ``mask`` field).

    Returns:
        (N,) float64 PSNR in dB, NaN where the mask is empty; at most :data:`PSNR_MAX_DB`.
    """
    error = mask.double() * (pred.double().clamp(0, 255) - true.double()) ** 2
    weight = mask.double().flatten(1).sum(1)
    mse = error.flatten(1).sum(1) / weight
    floor = 255.0**2 * 10.0 ** (-PSNR_MAX_DB / 10.0)
    psnr = 10.0 * torch.log10(255.0**2 / mse.clamp(min=floor))
    return torch.where(weight > 0, psnr, torch.full_like(psnr, math.nan))


class Tally:
    """Per-expression sums of the per-sample metrics, all-reduced across ranks.

    Args:
        expressions: every test expression, in the same order on every rank.
    """

    SUMS = ("samples", "vert_loss", "tex_loss", "screen_loss", "psnr_db", "psnr_samples")

    def __init__(self, expressions: list[str]):
        self.sums = {expression: dict.fromkeys(self.SUMS, 0.0) for expression in expressions}

    def add(
        self, expression: str, count: int, losses: Mapping[str, torch.Tensor], psnr: torch.Tensor
    ) -> None:
        """Add a sub-batch of ``count`` samples of one expression (losses are its means)."""
        sums = self.sums[expression]
        sums["samples"] += count
        for name in ("vert_loss", "tex_loss", "screen_loss"):
            sums[name] += count * float(losses[name].detach())
        seen = ~torch.isnan(psnr)
        sums["psnr_db"] += float(psnr[seen].sum())
        sums["psnr_samples"] += int(seen.sum())

    def all_reduce(self, device: torch.device) -> None:
        flat = {f"{exp}\t{name}": value for exp, sums in self.sums.items() for name, value in sums.items()}
        for key, value in all_reduce_sum(flat, device).items():
            expression, name = key.split("\t")
            self.sums[expression][name] = value

    def rows(self, texstd: float, screen: bool) -> list[dict]:
        """One row per expression and an ``overall`` row; None where a value is undefined."""
        total = {name: sum(sums[name] for sums in self.sums.values()) for name in self.SUMS}
        rows = []
        for expression, sums in [*self.sums.items(), ("overall", total)]:
            count = sums["samples"]
            row: dict[str, Any] = {"expression": expression, "samples": int(count)}
            for name in ("vert_loss", "tex_loss", "screen_loss"):
                row[name] = sums[name] / count if count else None
            row["tex_loss_8bit"] = sums["tex_loss"] / count * texstd**2 if count else None
            row["screen_loss"] = row["screen_loss"] if screen else None
            psnr_count = sums["psnr_samples"]
            row["psnr_db"] = sums["psnr_db"] / psnr_count if psnr_count else None
            rows.append(row)
        return rows


class Evaluator:
    """Runs the checkpoint over the test split of ``settings`` on this rank."""

    def __init__(self, args: argparse.Namespace, env: DistEnv):
        self.env = env
        self.model, self.settings, trained_on = load_model(args, env.device)
        self.source = ShardSource(self.settings.shards, stall_timeout=self.settings.stall_timeout)
        self.meta = self.source.metadata()
        if trained_on is not None and trained_on != self.source.manifest.entity:
            warnings.warn(
                f"the checkpoint was trained on {trained_on}, the shards hold {self.source.manifest.entity}",
                stacklevel=2,
            )
        self.split = build_split(self.settings)
        self.shards, self.num_test = select_shards(self.source.manifest, self.split, "test")
        self.expressions = sorted({exp for shard in self.shards for exp in shard.expressions})
        self._check_cameras()
        self.renderer, self.screen_note = None, "n/a: --lambda_screen is 0"
        if self.settings.screen_loss:
            self.renderer, self.screen_note = _renderer(env.device)
            if self.renderer is None:
                self.settings = replace(self.settings, lambda_screen=0.0, loss_weight_mask=None)
        weights = {name: getattr(self.settings, name) for name in LAMBDAS}
        self.run_net = partial(run_net, arch=self.settings.arch, weights=weights, renderer=self.renderer)
        self.stats = Statistics.build(
            self.meta, self.settings.tex_size, env.device, self.settings.loss_weight_mask
        )

    def _check_cameras(self) -> None:
        cameras = self.split.cameras("test") or self.source.manifest.cameras
        needed = 1 + max(
            (self.meta.cameras[name].index for name in cameras if name in self.meta.cameras), default=0
        )
        num_cameras = self.model.cc.num_cameras
        if needed > num_cameras:
            raise ValueError(
                f"--model_ckpt {self.settings.model_ckpt}: colour correction for {num_cameras} "
                f"cameras, but the test cameras reach KRT index {needed - 1}; evaluate on the entity the "
                "model was trained on"
            )

    def loader(self) -> torch.utils.data.DataLoader:
        dataset = ShardPass(
            self.source,
            self.shards,
            self.num_test,
            self.split,
            "test",
            self.env.rank,
            self.env.world_size,
            self.settings.tex_size,
            fields_for(self.settings),
        )
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.settings.val_batch_size,
            num_workers=self.settings.n_worker,
            pin_memory=self.env.device.type == "cuda",
        )

    def forward(self, batch: dict, sample: bool, tally: Tally | None) -> torch.Tensor:
        """Losses of one batch, one :func:`run_net` call per expression in it.

        Returns:
            0-d total loss of the whole batch (sub-batch totals weighted by their size).
        """
        expressions = batch["exp"]
        total = torch.zeros((), device=self.env.device)
        for expression in dict.fromkeys(expressions):
            index = [i for i, name in enumerate(expressions) if name == expression]
            part = batch if len(index) == len(expressions) else _select(batch, index)
            resolution = tuple(part["photo"].shape[1:3]) if "photo" in part else self.settings.resolution
            losses, outputs = self.run_net(self.model, part, self.stats, resolution=resolution, sample=sample)
            total = total + losses["total_loss"] * (len(index) / len(expressions))
            if tally is not None:
                with torch.no_grad():
                    true = texture_to_unit(part["tex"], self.stats.texmean, self.stats.texstd) * 255.0
                    psnr = masked_psnr(cast(torch.Tensor, outputs["pred_tex"]) * 255.0, true, part["mask"])
                tally.add(expression, len(index), losses, psnr)
        return total

    def measure(self, max_batches: int | None) -> Tally:
        """Protocol ``mean``: z = posterior mean, nothing updated."""
        tally = Tally(self.expressions)
        # cuDNN may otherwise pick convolution algorithms that accumulate in a varying order.
        backend = torch.backends.cudnn
        cudnn = backend.flags(backend.enabled, False, deterministic=True, allow_tf32=backend.allow_tf32)
        with torch.no_grad(), cudnn:
            for number, batch in enumerate(self.loader()):
                if max_batches is not None and number >= max_batches:
                    break
                self.forward(to_device(batch, self.env.device), sample=False, tally=tally)
        return tally

    def seed_protocol(self, val_num: int) -> Tally:
        """Protocol ``seed``: fit encoder and colour correction on the test set, then measure."""
        torch.manual_seed(self.settings.seed + self.env.rank)
        self.model.requires_grad_(False)
        encoder, colour = list(self.model.enc.parameters()), self.model.get_cc_params()
        for parameter in [*encoder, *colour]:
            parameter.requires_grad_(True)
        optimizers = [torch.optim.Adam(group, self.settings.lr, (0.9, 0.999)) for group in (encoder, colour)]
        for _ in range(SEED_FIT_PASSES):
            self._fit_pass(optimizers, val_num, None)
        tally = Tally(self.expressions)
        self._fit_pass(optimizers, None, tally)
        return tally

    def _fit_pass(
        self, optimizers: Sequence[torch.optim.Optimizer], max_batches: int | None, tally: Tally | None
    ) -> None:
        """One pass of Adam steps; ranks that ran out still join the gradient average."""
        params = [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
        batches, number = iter(self.loader()), 0
        while True:
            batch = next(batches, None) if max_batches is None or number < max_batches else None
            if not agree_any(batch is not None, self.env.device):
                return
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=False)
            if batch is not None:
                self.forward(to_device(batch, self.env.device), sample=True, tally=tally).backward()
            _average_gradients(params, batch is not None, self.env.device)
            for optimizer in optimizers:
                optimizer.step()
            number += 1


def _select(batch: dict, index: list[int]) -> dict:
    rows = torch.tensor(index)
    return {
        name: value[rows.to(value.device)] if isinstance(value, torch.Tensor) else [value[i] for i in index]
        for name, value in batch.items()
    }


def _renderer(device: torch.device):
    if device.type != "cuda":
        warnings.warn("--lambda_screen > 0 needs CUDA: the screen loss is not measured (n/a)", stacklevel=3)
        return None, "n/a: no CUDA device"
    from trainer.render import Renderer

    try:
        return Renderer(device), "measured"
    except RuntimeError as error:
        warnings.warn(f"screen loss not measured (n/a): {error}", stacklevel=3)
        return None, f"n/a: {error}"


def _average_gradients(params: list[nn.Parameter], has_batch: bool, device: torch.device) -> None:
    """Average gradients over the ranks that had a batch (every rank then takes the same step)."""
    if not is_distributed():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([float(has_batch)], device=device)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat[:-1] / flat[-1]
    for parameter, grad in zip(params, torch.split(flat, [p.numel() for p in params]), strict=True):
        parameter.grad = grad.view_as(parameter).clone()


def markdown(rows: list[dict]) -> str:
    """The table as Markdown, ``n/a`` where a value is undefined."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_text(row[name]) for name in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def _text(value: object) -> str:
    if value is None:
        return "n/a"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_results(folder: Path, rows: list[dict], info: dict) -> None:
    """Write ``metrics.json`` (rows, units and how they were made), ``metrics.csv``, ``metrics.md``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({**info, "units": UNITS, "rows": rows}, indent=1) + "\n")
    with open(folder / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows([[_text(row[name]) for name in COLUMNS] for row in rows])
    (folder / "metrics.md").write_text(markdown(rows) + "\n")


def run(args: argparse.Namespace) -> int:
    """Evaluate on this rank; rank 0 prints and writes the table."""
    if args.val_num is not None and args.val_num <= 0:
        raise ValueError(f"--val_num {args.val_num}: must be positive (leave it out for every test sample)")
    env = init_distributed(args.device or "auto")
    try:
        evaluator = Evaluator(args, env)
        if args.protocol == "seed":
            tally = evaluator.seed_protocol(args.val_num or SEED_VAL_NUM)
        else:
            tally = evaluator.measure(args.val_num)
        tally.all_reduce(env.device)
        rows = tally.rows(evaluator.meta.texstd, evaluator.renderer is not None)
        if env.is_main:
            measured = rows[-1]["samples"]
            limited = args.val_num is not None and args.protocol == "mean"
            if measured != evaluator.num_test and not limited:
                warnings.warn(
                    f"measured {measured} samples, the manifest lists {evaluator.num_test}", stacklevel=1
                )
            settings = evaluator.settings
            info = {name: getattr(settings, name) for name in ("model_ckpt", "arch", "tex_size", "nlatent")}
            info |= {"protocol": args.protocol, "val_num": args.val_num, "ranks": env.world_size}
            info |= {"entity": evaluator.source.manifest.entity, "test_samples": evaluator.num_test}
            info |= {"screen_loss": evaluator.screen_note, "texstd": evaluator.meta.texstd}
            write_results(Path(args.output), rows, info)
            print(
                f"protocol {args.protocol}: {measured} of {evaluator.num_test} test samples, {env.world_size} rank(s)"
            )
            print(markdown(rows))
            print(f"screen_loss: {evaluator.screen_note}; units in {Path(args.output) / 'metrics.json'}")
    finally:
        shutdown()
    return 0


RUN = "(default: the run's"
MODEL_FLAGS: dict[str, dict[str, Any]] = {
    "model_ckpt": {"required": True, "help": "our checkpoint.pt/best_model.pt, or a published .pth"},
    "shards": {"help": f"data service manifest URL or local shard folder {RUN})"},
    "arch": {"help": "override the architecture read off the checkpoint: base|res|warp|non|bilinear"},
    "nlatent": {"type": int, "help": "override the latent size read off the checkpoint"},
    "tex_size": {"type": int, "help": "override the texture size read off the checkpoint"},
    "test_segment_config": {
        "help": f'JSON {{"segment": [prefixes]}} of test expressions {RUN}, else EXP_ROM...)'
    },
    "camera_config": {"help": f'JSON {{"full": {{"train", "test", "visual": [cameras]}}}} {RUN})'},
    "val_batch_size": {"type": int, "help": f"batch size per rank {RUN}, else 8)"},
    "n_worker": {"type": int, "help": f"data loading workers per rank {RUN}, else 8)"},
    "device": {"choices": ("auto", "cuda", "cpu"), "help": "default: CUDA if available"},
}
TEST_FLAGS: dict[str, dict[str, Any]] = {
    "protocol": {
        "choices": PROTOCOLS,
        "default": "mean",
        "help": "mean: z = posterior mean, deterministic; "
        "seed: the reference test.py (fits on the test set, z sampled), to compare with its numbers",
    },
    "val_num": {
        "type": int,
        "help": "mean: at most this many batches per rank (default: every test sample "
        f"once); seed: batches per fitting pass (default {SEED_VAL_NUM}, the reference's)",
    },
    "lambda_screen": {
        "type": float,
        "help": f"> 0 measures the screen loss (CUDA + nvdiffrast) {RUN}, else 0)",
    },
    "loss_weight_mask": {"help": f"UV-space weight image of the screen loss {RUN}, else uniform)"},
    "lr": {"type": float, "help": f"seed protocol: Adam learning rate {RUN}, else 3e-4)"},
    "seed": {"type": int, "help": f"seed protocol: seed of the sampled z {RUN}, else 0)"},
    "output": {"default": "./runs/test", "help": "folder for metrics.json, metrics.csv and metrics.md"},
}
PARSER: dict[str, Any] = {"description": __doc__, "formatter_class": argparse.RawDescriptionHelpFormatter}


def add_flags(parser: argparse.ArgumentParser, flags: Mapping[str, dict]) -> None:
    """Add ``--name`` for each entry; flags left out are None (taken from the run or defaults)."""
    for name, options in flags.items():
        parser.add_argument(f"--{name}", **options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", **PARSER)
    add_flags(parser, {**MODEL_FLAGS, **TEST_FLAGS})
    return run(parser.parse_args(argv))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "test", help="evaluate a checkpoint: a table per test expression", **PARSER
    )
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs, or gloo ranks on CPU)")
    add_flags(parser, {**MODEL_FLAGS, **TEST_FLAGS})
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        print(f"--nproc {args.nproc}: use 1 or more", file=sys.stderr)
        return 2
    if args.nproc == 1 or "RANK" in os.environ:
        return run(args)
    from trainer.train import drop_flag

    forwarded = drop_flag(sys.argv[sys.argv.index("test") + 1 :], "--nproc")
    torchrun = f"-m torch.distributed.run --standalone --nproc_per_node={args.nproc} -m trainer.evaluate"
    return subprocess.call([sys.executable, *torchrun.split(), *forwarded])


if __name__ == "__main__":
    sys.exit(main())
