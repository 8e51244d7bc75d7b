"""Render chosen expressions and cameras with a trained model: PNG frames and an animated GIF.

    multiface visualize --shards URL_OR_FOLDER --model_ckpt runs/experiment/best_model.pt --out DIR \\
        [--expressions E061_Lips_Puffed ...] [--cameras 400004 ...] [--frames 30] [--mp4]

For every (expression, camera) and each of its first ``--frames`` frames it writes
``DIR/<expression>/<camera>/<frame>.png`` (the panels side by side, under a title) and each
panel alone as ``<frame>-<panel>.png``, then ``DIR/<expression>--<camera>.gif`` (and ``.mp4``
with ``--mp4`` where OpenCV can encode it), as the reference's visualize.py does.

With CUDA and nvdiffrast the prediction is the model rendered into the camera (z = posterior
mean), beside the photo, with the error where the mesh covers the photo. Without a renderer the
prediction is shown in texture space instead (predicted texture, true per-view texture, their
error over the seen texels, and the photo for context); the title and ``visualize.json`` say so.
Pictures get the reference's display gamma (:mod:`trainer.images`); error maps do not.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from shards.formats import read_camera_split
from trainer.data import ShardSource, Split, select_shards
from trainer.distributed import init_distributed
from trainer.evaluate import MODEL_FLAGS, ShardPass, add_flags, load_model
from trainer.images import display_gamma, texture_image
from trainer.loop import build_split, fields_for
from trainer.losses import texture_to_unit
from trainer.step import Statistics, run_net, to_device

DIFF_GAIN = 4.0
"""Error maps show |prediction - truth| in 8-bit levels times this (red: 64 levels or more)."""


def _picture(image: torch.Tensor) -> np.ndarray:
    """(H, W, 3) float [0, 1] -> uint8 with the display gamma."""
    return (display_gamma(image.float().clamp(0, 1)).cpu().numpy() * 255).round().astype(np.uint8)


def _error_map(error: torch.Tensor) -> np.ndarray:
    """(H, W, 3) absolute error in [0, 1] scale -> uint8 RGB JET map (blue: none, red: large)."""
    levels = (error.float().mean(-1) * 255 * DIFF_GAIN).clamp(0, 255).round().to(torch.uint8)
    return cv2.applyColorMap(levels.cpu().numpy(), cv2.COLORMAP_JET)[:, :, ::-1].copy()


def sample_panels(batch: dict, outputs: dict, stats: Statistics, coverage: torch.Tensor | None) -> list[dict]:
    """Named uint8 panels for each sample of a batch.

    Args:
        batch: collated fields with ``photo`` (N, H, W, 3), ``tex`` and ``mask`` (N, 3, T, T).
        outputs: :func:`run_net` outputs (``pred_screen`` (N, H, W, 3) when rendered).
        stats: normalisation statistics.
        coverage: (N, H, W, 1) float render coverage, or None in texture space.

    Returns:
        Per sample, panel name -> (rows, cols, 3) uint8 RGB, in display order.
    """
    panels = []
    true01 = texture_to_unit(batch["tex"], stats.texmean, stats.texstd)
    for i in range(batch["photo"].shape[0]):
        photo = batch["photo"][i]
        if coverage is not None:
            pred = outputs["pred_screen"][i]
            error = (pred - photo * coverage[i]).abs()
            panels.append({"photo": _picture(photo), "pred": _picture(pred), "diff": _error_map(error)})
            continue
        pred_tex, true_tex = outputs["pred_tex"][i], true01[i]
        error = texture_image((pred_tex - true_tex).abs() * batch["mask"][i])
        panels.append(
            {
                "photo": _picture(photo),
                "pred_tex": _picture(texture_image(pred_tex)),
                "true_tex": _picture(texture_image(true_tex)),
                "diff_tex": _error_map(error),
            }
        )
    return panels


LABELS = {
    "photo": "PHOTO",
    "pred": "PRED",
    "diff": f"DIFF x{DIFF_GAIN:g}",
    "pred_tex": "PRED TEXTURE",
    "true_tex": "TRUE TEXTURE",
    "diff_tex": f"DIFF x{DIFF_GAIN:g}",
}


def compose(panels: dict[str, np.ndarray], title: str, rows: int) -> np.ndarray:
    """Panels resized to ``rows`` high, labelled, side by side under a title bar; even sides."""
    scale = max(rows / 512, 0.4)
    resized = []
    for name, image in panels.items():
        cols = max(1, round(image.shape[1] * rows / image.shape[0]))
        panel = cv2.resize(image, (cols, rows), interpolation=cv2.INTER_AREA)
        cv2.putText(panel, LABELS[name], (8, int(30 * scale) + 4), 0, scale, (255, 255, 255), 2)
        resized.append(panel)
    row = np.hstack(resized)
    bar = np.zeros((int(48 * scale) + 8, row.shape[1], 3), np.uint8)
    cv2.putText(bar, title, (8, int(34 * scale) + 4), 0, 0.9 * scale, (255, 255, 255), 2)
    frame = np.vstack([bar, row])
    return np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)))


def write_gif(path: Path, frames: list[np.ndarray], fps: float) -> None:
    """An endlessly looping GIF, one image per frame."""
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def write_mp4(path: Path, frames: list[np.ndarray], fps: float) -> bool:
    """An MP4 (mpeg4) through OpenCV; False where this OpenCV cannot encode it."""
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        return False
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return True


def _renderer(device: torch.device):
    """A Renderer and None, or None and why there is none."""
    if device.type != "cuda":
        return None, "no CUDA device"
    from trainer.render import Renderer

    try:
        return Renderer(device), None
    except RuntimeError as error:
        return None, str(error)


def _choose(args: argparse.Namespace, settings, source: ShardSource) -> tuple[list[str], list[str]]:
    """Expressions (default: the test split's) and cameras (default: "visual", else the first two)."""
    manifest = source.manifest
    split = build_split(settings)
    expressions = args.expressions or [e for e in manifest.expressions if split.wants_expression(e, "test")]
    cameras = args.cameras
    if not cameras and settings.camera_config:
        cameras = read_camera_split(Path(settings.camera_config))["visual"]
    if not cameras:
        cameras = list(split.cameras("test") or manifest.cameras)[:2]
    for kind, chosen, known in (
        ("expression", expressions, manifest.expressions),
        ("camera", cameras, manifest.cameras),
    ):
        unknown = sorted(set(chosen) - set(known))
        if unknown or not chosen:
            raise ValueError(
                f"--{kind}s {' '.join(unknown) or '(none)'}: not in the shards of {manifest.entity}; "
                f"choose from {', '.join(known)}"
            )
    return expressions, cameras


def run(args: argparse.Namespace) -> int:
    if args.frames <= 0:
        raise ValueError(f"--frames {args.frames}: must be positive")
    device = init_distributed(args.device or "auto").device
    model, settings, _ = load_model(args, device)
    source = ShardSource(settings.shards, stall_timeout=settings.stall_timeout)
    meta = source.metadata()
    expressions, cameras = _choose(args, settings, source)
    frames = {exp: sorted(f for e, f in meta.frame_list if e == exp)[: args.frames] for exp in expressions}
    renderer, missing = _renderer(device)
    settings = replace(settings, lambda_screen=1.0 if renderer else 0.0, loss_weight_mask=None)
    split = Split(test_prefixes=tuple(expressions), test_cameras=tuple(cameras))
    shards, count = select_shards(source.manifest, split, "test")
    fields = tuple(dict.fromkeys([*fields_for(settings), "photo"]))
    dataset = ShardPass(source, shards, count, split, "test", 0, 1, settings.tex_size, fields, frames=frames)
    loader = torch.utils.data.DataLoader(dataset, settings.val_batch_size, num_workers=settings.n_worker)
    stats = Statistics.build(meta, settings.tex_size, device)
    weights = {
        name: getattr(settings, name) for name in ("lambda_verts", "lambda_tex", "lambda_screen", "lambda_kl")
    }
    mode = "rendered (nvdiffrast)" if renderer else f"texture space: no renderer ({missing})"
    out = Path(args.out)
    sequences: dict[tuple[str, str], list[tuple[str, Path]]] = {}
    with torch.no_grad():
        for batch in loader:
            batch = to_device(batch, device)
            resolution = tuple(batch["photo"].shape[1:3])
            _, outputs = run_net(
                model,
                batch,
                stats,
                arch=settings.arch,
                weights=weights,
                renderer=renderer,
                resolution=resolution,
                sample=False,
            )
            coverage = None
            if renderer is not None:
                ones = torch.ones_like(batch["tex"][:, :1])
                coverage = renderer.render(
                    batch["M"],
                    outputs["pred_verts"],
                    batch["vert_ids"],
                    batch["uvs"],
                    batch["uv_ids"],
                    ones,
                    resolution,
                )
            for i, panels in enumerate(sample_panels(batch, outputs, stats, coverage)):
                exp, cam, frame = batch["exp"][i], batch["cam_idx"][i], batch["frame"][i]
                folder = out / exp / cam
                folder.mkdir(parents=True, exist_ok=True)
                for name, image in panels.items():
                    Image.fromarray(image).save(folder / f"{frame}-{name}.png")
                title = f"{exp}  camera {cam}  frame {frame}" + (
                    "" if renderer else "  (texture space: no renderer)"
                )
                Image.fromarray(compose(panels, title, args.rows)).save(folder / f"{frame}.png")
                # Frames go to disk as they come; each animation reads back only its own.
                sequences.setdefault((exp, cam), []).append((frame, folder / f"{frame}.png"))
    listing: list[dict[str, Any]] = []
    for (exp, cam), shots in sorted(sequences.items()):
        shots.sort(key=lambda shot: shot[0])
        images = [np.asarray(Image.open(path)) for _, path in shots]
        gif = out / f"{exp}--{cam}.gif"
        write_gif(gif, images, args.fps)
        entry = {"expression": exp, "camera": cam, "frames": [f for f, _ in shots], "gif": str(gif)}
        if args.mp4:
            mp4 = out / f"{exp}--{cam}.mp4"
            entry["mp4"] = (
                str(mp4) if write_mp4(mp4, images, args.fps) else "not written: OpenCV cannot encode mp4v"
            )
        listing.append(entry)
        print(f"{exp} camera {cam}: {len(images)} frames -> {gif}")
    summary = {"prediction": mode, "model_ckpt": str(args.model_ckpt), "sequences": listing}
    (out / "visualize.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"prediction: {mode}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, MODEL_FLAGS)
    parser.add_argument(
        "--expressions", nargs="+", default=None, help="expressions to show (default: the test split's)"
    )
    parser.add_argument(
        "--cameras",
        nargs="+",
        default=None,
        help='cameras to show (default: the camera config\'s "visual", else the first two test cameras)',
    )
    parser.add_argument(
        "--frames", type=int, default=30, help="first N frames of each expression (default: 30)"
    )
    parser.add_argument("--out", default="./runs/visualize", help="output folder for PNG frames and GIFs")
    parser.add_argument("--rows", type=int, default=512, help="height of each panel in pixels (default: 512)")
    parser.add_argument(
        "--fps", type=float, default=20.0, help="frames per second of the GIF/MP4 (default: 20)"
    )
    parser.add_argument(
        "--mp4", action="store_true", help="also write an MP4 per expression and camera (OpenCV)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.visualize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "visualize",
        help="render chosen expressions and cameras to PNG frames and GIFs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


if __name__ == "__main__":
    sys.exit(main())
