"""Typed, validated configuration of a training run, with the reference's flag names.

``TrainConfig`` is built from ``--flags`` (the published training commands work with their data
flags swapped for ``--shards``), validated in ``__post_init__`` and saved as JSON beside every
checkpoint.
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ARCHS = ("base", "res", "warp", "non", "bilinear")
LOADERS = ("auto", "processes", "ring")
"""``--loader`` choices (:mod:`trainer.feeder`)."""


@dataclass
class TrainConfig:
    shards: str = ""
    arch: str = "base"
    nlatent: int = 256
    lr: float = 3e-4
    tex_size: int = 1024
    resolution: tuple[int, int] = (2048, 1334)
    mesh_inp_size: int = 21918
    lambda_verts: float = 1.0
    lambda_tex: float = 1.0
    lambda_screen: float = 0.0
    lambda_kl: float = 1e-2
    train_batch_size: int = 16
    val_batch_size: int = 8
    epochs: int = 50
    max_iter: int = 200000
    log_every: int = 1000
    val_every: int = 5000
    val_num: int = 500
    n_worker: int = 8
    pass_thres: float = 50.0
    result_path: str = "./runs/experiment"
    model_ckpt: str | None = None
    test_segment_config: str | None = None
    camera_config: str | None = None
    loss_weight_mask: str | None = None
    resume: bool = False
    seed: int = 0
    shuffle_buffer: int = 256
    stall_timeout: float = 60.0
    device: str = "auto"
    collective_timeout: float = 300.0
    antialias: bool = False
    no_tf32: bool = False
    compile: str = ""
    bf16: bool = False
    gpu_normalise: bool = False
    loader: str = "auto"
    image_every: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("--shards is required: the data service's manifest URL or a local shard folder")
        if self.arch not in ARCHS:
            raise ValueError(f"--arch {self.arch!r}: expected one of {', '.join(ARCHS)}")
        if self.tex_size not in (256, 512, 1024):
            raise ValueError(
                f"--tex_size {self.tex_size}: expected 256, 512 or 1024 (the decoder doubles from 4x4)"
            )
        self.resolution = tuple(int(value) for value in self.resolution)  # type: ignore[assignment]
        if len(self.resolution) != 2 or min(self.resolution) <= 0:
            raise ValueError(f"--resolution {self.resolution}: expected two positive integers, ROWS COLS")
        for name in ("nlatent", "mesh_inp_size", "train_batch_size", "val_batch_size", "max_iter", "epochs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} {getattr(self, name)}: must be positive")
        for name in ("log_every", "val_every", "val_num"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} {getattr(self, name)}: must be positive")
        if self.n_worker < 0:
            raise ValueError(f"--n_worker {self.n_worker}: must be 0 or more")
        if self.loader not in LOADERS:
            raise ValueError(f"--loader {self.loader!r}: expected one of {', '.join(LOADERS)}")
        if self.lr <= 0:
            raise ValueError(f"--lr {self.lr}: must be positive")
        for name in ("lambda_verts", "lambda_tex", "lambda_screen", "lambda_kl"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} {getattr(self, name)}: must be 0 or more")
        if self.collective_timeout <= self.stall_timeout:
            raise ValueError(
                f"--collective_timeout {self.collective_timeout} must exceed --stall_timeout {self.stall_timeout}: "
                "a stalled download must be retried before the job is declared stuck"
            )
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"--device {self.device!r}: expected auto, cuda or cpu")
        if self.loss_weight_mask is not None and self.lambda_screen == 0:
            warnings.warn("--loss_weight_mask has no effect with --lambda_screen 0", stacklevel=2)
        if self.compile not in (
            "",
            "default",
            "max-autotune-no-cudagraphs",
            "max-autotune",
            "reduce-overhead",
        ):
            raise ValueError(
                f"--compile {self.compile!r}: expected '' or a torch.compile mode (default, reduce-overhead, ...)"
            )
        if self.antialias and self.lambda_screen == 0:
            warnings.warn("--antialias has no effect with --lambda_screen 0", stacklevel=2)

    def loader_kind(self, device: torch.device) -> str:
        """``ring`` or ``processes``: what ``--loader auto`` means on ``device``.

        Auto is the ring on CUDA with ``--gpu_normalise`` (uint8 batches, about 14 MB per sample
        with the photo); without it a sample is float32 (about 71 MB), and the ring's
        ``prefetch + 2`` slots per worker could outgrow a container's /dev/shm.
        """
        if self.loader == "auto":
            return "ring" if device.type == "cuda" and self.gpu_normalise else "processes"
        return self.loader

    @property
    def screen_loss(self) -> bool:
        return self.lambda_screen > 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {item.name for item in fields(cls)}
        return cls(**{name: value for name, value in values.items() if name in known})


_HELP = {
    "shards": "data service manifest URL (http://HOST:PORT/api/v1/entities/<entity>/manifest.json) or a local "
    "shard folder; the bearer token comes from the MULTIFACE_TOKEN environment variable",
    "arch": "model architecture: base|res|warp|non|bilinear",
    "nlatent": "latent code dimension (128|256)",
    "lr": "learning rate of both Adam optimisers",
    "tex_size": "texture resolution the model works at (textures are resized to it)",
    "resolution": "screen-loss render resolution, ROWS COLS",
    "mesh_inp_size": "input mesh dimension (7306*3)",
    "lambda_verts": "weight of the vertex loss",
    "lambda_tex": "weight of the texture loss",
    "lambda_screen": "weight of the screen-space loss (needs CUDA and nvdiffrast when > 0)",
    "lambda_kl": "weight of the KL divergence",
    "train_batch_size": "training batch size per rank",
    "val_batch_size": "validation batch size per rank",
    "epochs": "training epochs (max_iter wins when reached first)",
    "max_iter": "maximum training iterations",
    "log_every": "iterations between printed/logged training losses",
    "val_every": "iterations between validations and checkpoints",
    "val_num": "validation batches per validation",
    "n_worker": "data loading worker processes per rank",
    "pass_thres": "skip a batch (on every rank) whose loss is this many times the previous one",
    "result_path": "output folder: checkpoints, TensorBoard logs, images",
    "model_ckpt": "initial weights: ours or a published reference checkpoint (module. prefix or not)",
    "test_segment_config": 'JSON {"segment": [expression prefixes]} of test expressions '
    "(default EXP_ROM, EXP_free_face)",
    "camera_config": 'JSON {"full": {"train": [...], "test": [...], "visual": [...]}} camera split',
    "loss_weight_mask": "UV-space weight image for the screen loss (default: uniform)",
    "resume": "continue from result_path/checkpoint.pt at its step, optimiser and data position if it exists "
    "(so torchrun --max-restarts can rerun the same command)",
    "seed": "seed of shuffles and initialisation",
    "shuffle_buffer": "samples held per data worker for shuffling",
    "stall_timeout": "seconds without data before a shard download is abandoned and retried",
    "device": "auto (CUDA if available), cuda or cpu",
    "collective_timeout": "seconds a collective may wait for a stuck rank before the job fails and torchrun "
    "restarts it (NCCL's default is 600)",
    "antialias": "antialias the screen-loss render for silhouette gradients",
    "image_every": "iterations between image grids in TensorBoard (default: log_every)",
    "no_tf32": "train in strict fp32 (the reference configuration); TF32 is on by default on CUDA and "
    "keeps the losses within noise (BENCHMARKS.md)",
    "compile": "torch.compile the training forward: '' (eager, default) or a mode such as 'default'",
    "gpu_normalise": "data workers return the stored uint8 images; flip, mask, normalise and resize run on the "
    "training device (trainer.gpu_decode), giving the same fields with less CPU per sample; delta-rice shards "
    "are decoded there too (trainer.gpu_rice)",
    "bf16": "bfloat16 autocast of the training forward (CUDA only; evaluation stays fp32)",
    "loader": "how training batches reach the device: 'processes' (DataLoader workers, pin_memory) or 'ring' "
    "(the same workers write into shared page-locked buffers, trainer.feeder; 4-6x the batch transfer rate on an "
    "H200 host, BENCHMARKS.md); 'auto' is ring on CUDA with --gpu_normalise. The ring keeps prefetch+2 batches per "
    "worker in /dev/shm",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every TrainConfig field as a flag with the reference's name."""
    defaults = TrainConfig.__dataclass_fields__
    for item in fields(TrainConfig):
        if item.name == "extra":
            continue
        default = defaults[item.name].default
        flag = f"--{item.name}"
        helptext = _HELP.get(item.name, "") + (f" (default: {default})" if default not in (None, "") else "")
        if item.name == "resolution":
            parser.add_argument(
                flag, type=int, nargs=2, default=list(default), metavar=("ROWS", "COLS"), help=helptext
            )
        elif isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=_HELP.get(item.name, ""))
        else:
            kind = {int: int, float: float}.get(type(default), str)
            parser.add_argument(flag, type=kind, default=default, help=helptext)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if getattr(args, "local_rank", None) is not None:
        warnings.warn(
            "--local_rank is ignored: the rank comes from torchrun's LOCAL_RANK variable", stacklevel=2
        )
    values = {item.name: getattr(args, item.name) for item in fields(TrainConfig) if hasattr(args, item.name)}
    return TrainConfig(**values)
