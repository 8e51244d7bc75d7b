"""The training loop: streaming DDP training of the reference models with the reference losses.

Differences from the reference's train.py, each a fix of a defect it has (reference section 5):
the loss-spike skip is decided on all ranks together; each epoch reshuffles; validation is
all-reduced and uses z = mean without touching the trained colour correction; checkpoints are
complete and atomic; images are written without crashing when the screen loss is on.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from shards.formats import read_camera_split, read_test_segment
from shards.samples import DEFAULT_TEST_PREFIXES
from trainer import checkpointing
from trainer.config import TrainConfig
from trainer.data import ShardSource, ShardStream, Split, select_shards
from trainer.distributed import DistEnv, agree_any, all_reduce_mean, barrier
from trainer.feeder import RingBatches
from trainer.gpu_decode import TextureStatistics, finish_on_device
from trainer.images import grid
from trainer.models import build_model, load_weights
from trainer.speed import SpeedOptions, apply_speedups
from trainer.step import LOSS_NAMES, Statistics, read_losses, run_net, to_device

UNITS = {
    "total_loss": "weighted sum",
    "vert_loss": "normalised vertex units",
    "tex_loss": "8-bit MSE / texstd^2",
    "screen_loss": "8-bit MSE / texstd^2",
    "kl": "per latent dim",
}


def build_split(config: TrainConfig) -> Split:
    prefixes = tuple(DEFAULT_TEST_PREFIXES)
    if config.test_segment_config:
        prefixes = tuple(read_test_segment(Path(config.test_segment_config)))
    train_cameras = test_cameras = None
    if config.camera_config:
        split = read_camera_split(Path(config.camera_config))
        train_cameras, test_cameras = tuple(split["train"]) or None, tuple(split["test"]) or None
    return Split(prefixes, train_cameras, test_cameras)


def fields_for(config: TrainConfig) -> tuple[str, ...]:
    """Decoded fields a run needs: no photo without the screen loss."""
    fields = ["tex", "avg_tex", "mask", "aligned_verts", "M", "view", "cam", "exp", "frame", "cam_idx"]
    if config.screen_loss:
        fields += ["photo", "uvs", "vert_ids", "uv_ids"]
    return tuple(fields)


class Trainer:
    """Builds data, model and optimisers from a config and runs training on this rank."""

    def __init__(self, config: TrainConfig, env: DistEnv):
        self.config = config
        self.env = env
        self.result_path = Path(config.result_path)
        self.source = ShardSource(config.shards, stall_timeout=config.stall_timeout)
        self.meta = self.source.metadata()
        self.split = build_split(config)
        self.weights = {
            "lambda_verts": config.lambda_verts,
            "lambda_tex": config.lambda_tex,
            "lambda_screen": config.lambda_screen,
            "lambda_kl": config.lambda_kl,
        }
        self.stats = Statistics.build(self.meta, config.tex_size, env.device, config.loss_weight_mask)
        self.texture_stats = TextureStatistics.build(self.meta, env.device) if config.gpu_normalise else None
        self.renderer = None
        if config.screen_loss:
            from trainer.render import Renderer

            self.renderer = Renderer(env.device, antialias=config.antialias)
        torch.manual_seed(config.seed)
        num_cams = len(self.meta.cameras)
        self.model = build_model(config.arch, config.tex_size, config.mesh_inp_size, config.nlatent, num_cams)
        self.model.to(env.device)
        if config.model_ckpt:
            load_weights(self.model, config.model_ckpt)
        if env.device.type != "cuda" and (config.bf16 or config.compile):
            warnings.warn("--bf16 and --compile only apply on CUDA; ignored on the CPU", stacklevel=2)
        cuda = env.device.type == "cuda"
        self.speed = apply_speedups(
            self.model,
            SpeedOptions(
                tf32=not config.no_tf32,
                compile_mode=(config.compile or None) if cuda else None,
                bf16=config.bf16 and cuda,
            ),
            env.device,
        )
        self.ddp: nn.Module = self.model
        if env.world_size > 1:
            device_ids = [env.device.index] if cuda else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.train_module = self.speed.training_module(self.ddp)
        adam = {"lr": config.lr, "betas": (0.9, 0.999), **self.speed.adam_kwargs}
        self.optimizer = torch.optim.Adam(self.model.get_model_params(), **adam)
        self.optimizer_cc = torch.optim.Adam(self.model.get_cc_params(), **adam)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=0.95)
        self.step = 0
        self.epoch = 0
        self.best = math.inf
        self.skipped = 0
        if config.resume:
            self._resume()
        self.train_shards, self.num_train = select_shards(self.source.manifest, self.split, "train")
        self.test_shards, self.num_test = select_shards(self.source.manifest, self.split, "test")
        per_step = env.world_size * config.train_batch_size
        if self.num_train < per_step:
            raise ValueError(
                f"{self.num_train} training samples cannot fill one step of {env.world_size} ranks x "
                f"--train_batch_size {config.train_batch_size}; lower the batch size"
            )
        self.steps_per_epoch = self.num_train // per_step
        self.writer = None
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.result_path.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(self.result_path / "tensorboard"))

    def _loader(self, part: str, batch_size: int, start_epoch: int) -> Iterable[dict]:
        shards, count = (
            (self.train_shards, self.num_train) if part == "train" else (self.test_shards, self.num_test)
        )
        stream = ShardStream(
            self.source,
            shards,
            count,
            self.split,
            part,
            self.env.rank,
            self.env.world_size,
            self.config.tex_size,
            fields_for(self.config),
            seed=self.config.seed,
            shuffle_buffer=self.config.shuffle_buffer,
            start_epoch=start_epoch,
            device_finish=self.config.gpu_normalise,
        )
        workers = self.config.n_worker
        pin = self.env.device.type == "cuda"
        if part == "train" and workers > 0 and self.config.loader_kind(self.env.device) == "ring":
            finish = self._finish if self.texture_stats is not None else None
            return RingBatches(stream, batch_size, workers, self.env.device, prefetch=2, finish=finish)
        return torch.utils.data.DataLoader(
            stream,
            batch_size=batch_size,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=workers > 0,
            prefetch_factor=2 if workers > 0 else None,
        )

    def _batch(self, batch: dict) -> dict:
        """Move a batch to the device, finishing the texture treatment there with --gpu_normalise."""
        batch = to_device(batch, self.env.device)
        return self._finish(batch) if self.texture_stats is not None else batch

    def _finish(self, batch: dict) -> dict:
        assert self.texture_stats is not None
        return finish_on_device(batch, self.texture_stats, self.config.tex_size)

    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_cc": self.optimizer_cc.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "best": self.best,
            "skipped": self.skipped,
            # Tensors, not numpy arrays, so that torch.load(weights_only=True) reads the file.
            "statistics": {
                "texmean": torch.from_numpy(self.meta.texmean),
                "texstd": self.meta.texstd,
                "vertmean": torch.from_numpy(self.meta.vertmean),
                "vertstd": self.meta.vertstd,
            },
            "cameras": {name: camera.index for name, camera in self.meta.cameras.items()},
            "entity": self.source.manifest.entity,
            "config": self.config.to_json(),
        }

    def _resume(self) -> None:
        path = self.result_path / checkpointing.CHECKPOINT
        if not path.is_file():
            # torchrun --max-restarts reruns the same command: the first run has nothing to resume.
            if self.env.is_main:
                print(f"--resume: no {path} yet; starting at step 0", flush=True)
            return
        state = checkpointing.load_checkpoint(path, self.env.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.optimizer_cc.load_state_dict(state["optimizer_cc"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.best = state["step"], state["epoch"], state["best"]
        self.skipped = state.get("skipped", 0)
        checkpointing.load_rank_rng(self.result_path, self.env.rank)
        if self.env.is_main:
            digest = checkpointing.state_digest(self.model.state_dict())
            print(f"resumed at step {self.step}, epoch {self.epoch} (model sha256 {digest[:16]})", flush=True)

    def save(self, best: bool = False) -> None:
        # Every rank writes its RNG state; on nodes without a shared file system the folder
        # exists only where rank 0 runs unless each rank makes it.
        self.result_path.mkdir(parents=True, exist_ok=True)
        checkpointing.save_rank_rng(self.result_path, self.env.rank)
        barrier()
        if self.env.is_main:
            checkpointing.save_checkpoint(self.result_path, self._state(), self.config.to_json(), best)
        barrier()

    def _log(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def validate(self) -> dict[str, float]:
        """Mean losses over ``val_num`` test batches on every rank, all-reduced (z = mean)."""
        if not self.test_shards:
            return {}
        self.model.eval()
        sums = dict.fromkeys(LOSS_NAMES, 0.0)
        loader = self._loader("test", self.config.val_batch_size, self.epoch)
        batches = iter(loader)
        with torch.no_grad(), self.speed.eval_precision(), contextlib.closing(_Closable(loader)):
            for _ in range(self.config.val_num):
                batch = self._batch(next(batches))
                losses, _ = run_net(
                    self.model,
                    batch,
                    self.stats,
                    arch=self.config.arch,
                    weights=self.weights,
                    renderer=self.renderer,
                    resolution=self.config.resolution,
                    sample=False,
                )
                for name in LOSS_NAMES:
                    sums[name] += float(losses[name])
        self.model.train()
        return all_reduce_mean(
            {name: value / self.config.val_num for name, value in sums.items()}, self.env.device
        )

    def train(self) -> dict[str, float]:
        """Run until ``max_iter`` steps (or ``epochs``); returns the last all-reduced losses."""
        config, env = self.config, self.env
        last_steps = min(config.max_iter, config.epochs * self.steps_per_epoch)
        if env.is_main:
            print(
                f"train: {self.num_train} samples in {len(self.train_shards)} shards, "
                f"test: {self.num_test} samples in {len(self.test_shards)} shards; "
                f"{self.steps_per_epoch} steps per epoch on {env.world_size} rank(s), device {env.device}"
            )
            if self.source.manifest.image_codec == "delta-rice" and not config.gpu_normalise:
                print(
                    "note: these shards store delta-rice images, made for decoding on the GPU; without "
                    "--gpu_normalise the data workers decode them on the CPU (slowly)",
                    flush=True,
                )
        train_loader = self._loader("train", config.train_batch_size, self.epoch)
        batches = iter(train_loader)
        # The ring hands batches over already on the device and finished (RingBatches' finish).
        ready = isinstance(train_loader, RingBatches)
        previous = {name: math.inf for name in ("total_loss", "vert_loss", "kl")}
        window: dict[str, float] = {}
        bar = tqdm(
            total=last_steps, initial=self.step, desc="train", disable=not env.is_main, dynamic_ncols=True
        )
        started = time.monotonic()
        while self.step < last_steps:
            batch = next(batches) if ready else self._batch(next(batches))
            losses, outputs = run_net(
                self.train_module,
                batch,
                self.stats,
                arch=config.arch,
                weights=self.weights,
                renderer=self.renderer,
                resolution=config.resolution,
                screen_loss=self.speed.screen_loss,
            )
            values = read_losses(losses)
            spike = not all(math.isfinite(value) for value in values.values()) or any(
                values[name] > config.pass_thres * previous[name] for name in previous
            )
            if agree_any(spike, env.device):
                # Every rank skips together: a rank that skipped backward alone would hang DDP.
                self.skipped += 1
                continue
            previous = {name: values[name] for name in previous}
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer_cc.zero_grad(set_to_none=True)
            losses["total_loss"].backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10)
            self.optimizer.step()
            self.optimizer_cc.step()
            self.step += 1
            bar.update(1)
            if self.step % self.steps_per_epoch == 0:
                self.epoch += 1
                self.scheduler.step()
            if self.step % config.log_every == 0 or self.step == last_steps:
                window = all_reduce_mean(values, env.device)
                self._log("train", window, self.step)
                if env.is_main:
                    bar.write(format_losses(f"step {self.step}", window))
            image_every = config.image_every or config.log_every
            if env.is_main and self.writer is not None and self.step % image_every == 0:
                self.writer.add_image(
                    "train/grid",
                    grid(batch, outputs, self.stats.texmean, self.stats.texstd),
                    self.step,
                    dataformats="HWC",
                )
            if self.step % config.val_every == 0 or self.step == last_steps:
                validation = self.validate()
                self._log("val", validation, self.step)
                key = "screen_loss" if config.screen_loss else "tex_loss"
                improved = bool(validation) and validation[key] < self.best
                if improved:
                    self.best = validation[key]
                if env.is_main and validation:
                    bar.write(format_losses(f"val  {self.step}", validation))
                self.save(best=improved)
        bar.close()
        _Closable(train_loader).close()
        # Shards refused for a failed sha256 are reported by the data workers on stderr.
        print(f"rank {env.rank}: {self.step} steps, {self.skipped} skipped batches", flush=True)
        if env.is_main:
            elapsed = time.monotonic() - started
            print(f"done: {self.step} steps, {self.skipped} skipped batches, {elapsed:.1f} s")
            if self.writer is not None:
                self.writer.close()
        return window


class _Closable:
    """``close()`` for either loader: unpins RingBatches' buffers; a DataLoader needs nothing."""

    def __init__(self, loader: Iterable[dict]):
        self.loader = loader

    def close(self) -> None:
        if isinstance(self.loader, RingBatches):
            self.loader.close()


def format_losses(title: str, values: dict[str, float]) -> str:
    parts = [f"{name} {values[name]:.4f}" for name in LOSS_NAMES if name in values]
    return f"{title}: " + ", ".join(parts) + "  (vert: normalised units; tex/screen: 8-bit MSE / texstd^2)"
