"""Training speed-ups that leave the model's eval-mode outputs alone, and one place that applies them.

Measured by ``bench/bench_train.py`` (results in ``bench/results_train.md``). Each option changes
how a training step is computed, never what the model is: weights, state-dict keys, checkpoints
and the eval-mode forward (``sample=False`` under :meth:`Speedups.eval_precision`) stay those of
plain fp32 eager PyTorch, so validation numbers and exported models do not move with the flags.

Defaults follow the H200 measurements (base, batch 16, texture 1024, screen loss at 2048 x 1334,
each option alone against the fp32 reference): only ``tf32`` is on (1.15x, loss values within
6% of the sampling noise after 3 steps). ``cudnn_benchmark`` and ``fused_adam`` gained nothing
(1.00x), ``channels_last`` lost (0.93x), ``bf16`` gained 3% with the screen loss and lost without
it. ``compile_mode="default"`` gained 1.25-1.67x over the reference across the architectures
(with TF32 and bf16) for 20-35 s of compilation; it is off by default until its loss values are
measured without bf16 (``python3 bench/bench_train.py --ours tf32 --compile-modes default``).

* ``tf32``: TF32 tensor cores for fp32 matmuls and cuDNN convolutions inside training steps.
  PyTorch already enables TF32 for cuDNN convolutions by default (``cudnn.allow_tf32`` is True
  out of the box); this also enables it for matmuls. :meth:`Speedups.eval_precision` turns both
  off, so evaluation is full fp32 whatever the training flags.
* ``cudnn_benchmark``: let cuDNN time its algorithms once per shape (shapes are static here).
* ``channels_last``: NHWC weights and activations (cuDNN's faster layout on tensor cores).
* ``fused_adam``: one fused CUDA kernel for each Adam step instead of a sequence of foreach ops.
* ``compile_mode``: ``torch.compile`` the training forward (``"default"`` or
  ``"max-autotune-no-cudagraphs"``); the eager module still serves evaluation.
* ``bf16``: autocast the model's forward to bfloat16 (losses and rendering stay fp32). Off by
  default: it changes loss values beyond sampling noise unless the benchmark says otherwise.

Typical wiring in the trainer::

    speed = apply_speedups(model, SpeedOptions(), device)   # after model.to(device), before DDP
    ddp = DistributedDataParallel(model, ...) if world_size > 1 else model
    train_module = speed.training_module(ddp)                 # pass this to run_net when training
    optimizer = torch.optim.Adam(params, lr, betas, **speed.adam_kwargs)
    with torch.no_grad(), speed.eval_precision():
        ...  # validation / evaluation with the plain model
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from trainer import losses

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")


@dataclass(frozen=True)
class SpeedOptions:
    """Which speed-ups to apply; the defaults are the ones that keep results (see module docstring).

    Attributes:
        tf32: TF32 for fp32 matmuls and convolutions during training (CUDA only).
        cudnn_benchmark: cuDNN autotuning of convolution algorithms (CUDA only).
        channels_last: NHWC memory format for the model's 4-D parameters and activations.
        fused_adam: fused CUDA Adam kernels (CUDA only).
        compile_mode: None (eager) or a ``torch.compile`` mode for the training forward.
        bf16: bfloat16 autocast of the model's training forward (CUDA only).
    """

    tf32: bool = True
    cudnn_benchmark: bool = False
    channels_last: bool = False
    fused_adam: bool = False
    compile_mode: str | None = None
    bf16: bool = False

    def __post_init__(self) -> None:
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"compile_mode {self.compile_mode!r}: expected None (eager) or one of {', '.join(COMPILE_MODES)}"
            )

    @classmethod
    def reference(cls) -> SpeedOptions:
        """The reference configuration: fp32 without TF32, eager, no autotuning, foreach Adam."""
        return cls(tf32=False, cudnn_benchmark=False, channels_last=False, fused_adam=False)


def set_backend_flags(tf32: bool, cudnn_benchmark: bool) -> None:
    """Set the process-wide TF32 and cuDNN-benchmark flags.

    Only the legacy ``allow_tf32`` flags are used: mixing them with the newer ``fp32_precision``
    settings makes PyTorch raise when either is read later (torch >= 2.9).
    """
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark


class AutocastForward(nn.Module):
    """Runs a model's forward under bfloat16 autocast and returns its floating outputs as fp32.

    Args:
        module: the model (or its DDP wrapper); its outputs are tensors or tuples of tensors.
        device_type: ``"cuda"``.
    """

    def __init__(self, module: nn.Module, device_type: str = "cuda") -> None:
        super().__init__()
        self.module = module
        self.device_type = device_type

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            outputs = self.module(*args, **kwargs)
        if isinstance(outputs, tuple):
            return tuple(_to_float(output) for output in outputs)
        return _to_float(outputs)


def _to_float(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    return value


@dataclass
class Speedups:
    """What :func:`apply_speedups` set up; hands out the training module and optimiser options.

    Attributes:
        options: the options applied.
        device: the training device.
        adam_kwargs: extra keyword arguments for ``torch.optim.Adam`` (``fused=True`` or none).
    """

    options: SpeedOptions
    device: torch.device
    adam_kwargs: dict = field(default_factory=dict)

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    @functools.cached_property
    def screen_loss(self) -> Callable[..., torch.Tensor]:
        """:func:`trainer.losses.screen_loss`, compiled with the model when ``compile_mode`` is set.

        Compiled, its subtract, square, weight and mean over the (N, 2048, 1334, 3) images (and
        their backward) run as one fused kernel each way instead of a pass per operation.
        """
        if self.options.compile_mode is None:
            return losses.screen_loss
        return torch.compile(losses.screen_loss, dynamic=False)

    def training_module(self, module: nn.Module) -> nn.Module:
        """The module ``run_net`` should call during training: ``module`` with autocast/compile.

        Args:
            module: the model, or its DistributedDataParallel wrapper (compile after wrapping).

        Returns:
            A module sharing ``module``'s parameters; call the plain model for evaluation.
        """
        if self.options.bf16 and self.on_cuda:
            module = AutocastForward(module, self.device.type)
        if self.options.compile_mode is not None:
            mode = None if self.options.compile_mode == "default" else self.options.compile_mode
            module = torch.compile(module, mode=mode)  # type: ignore[assignment]
        return module

    @contextlib.contextmanager
    def eval_precision(self) -> Iterator[None]:
        """Full fp32 (no TF32) inside the block, the training flags restored after it."""
        if not self.on_cuda:
            yield
            return
        matmul, conv = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul
            torch.backends.cudnn.allow_tf32 = conv


def apply_speedups(model: nn.Module, options: SpeedOptions, device: torch.device) -> Speedups:
    """Set backend flags and the model's memory format; return the rest to apply later.

    Call after ``model.to(device)`` and before wrapping it in DistributedDataParallel (DDP
    records parameter layouts when it is built).

    Args:
        model: the model, already on ``device``; converted to channels_last in place if asked.
        options: which speed-ups.
        device: the training device.

    Returns:
        A :class:`Speedups` for the training module, the Adam options and evaluation precision.
    """
    cuda = device.type == "cuda"
    if not cuda and options.bf16:
        # The CUDA-only options that may be defaults (tf32, cudnn_benchmark, fused_adam) mean
        # "where available"; bf16 is never a default, so asking for it on the CPU must not pass silently.
        warnings.warn(f"SpeedOptions.bf16 only applies on CUDA; ignored on {device}", stacklevel=2)
    if cuda:
        set_backend_flags(options.tf32, options.cudnn_benchmark)
    if options.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    adam_kwargs = {"fused": True} if cuda and options.fused_adam else {}
    return Speedups(options=options, device=device, adam_kwargs=adam_kwargs)
