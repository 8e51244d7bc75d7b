"""``multiface visualize`` (trainer.visualize) on a synthetic entity: PNG frames and an animated GIF
per chosen (expression, camera), texture-space panels on the CPU, rendered panels on the GPU."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer import visualize
from trainer.checkpointing import BEST
from trainer.config import TrainConfig
from trainer.distributed import init_distributed
from trainer.loop import Trainer

TEST_EXPRESSION = "E061_Lips_Puffed"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """Synthetic entity (3 frames, 2 cameras) -> shards -> our best_model.pt with fresh weights."""
    from shards.ingest import ingest
    from shards.synth import synthesize

    base = tmp_path_factory.mktemp("visualize")
    entity = synthesize(
        base / "raw", expressions=2, frames=3, cameras=2, photo_size=(32, 24), tex_size=64, seed=6
    )
    manifest = ingest(entity, base / "shards", shard_size=2_000_000)
    segment = base / "segment.json"
    segment.write_text(json.dumps({"segment": [TEST_EXPRESSION]}))
    config = TrainConfig(
        shards=str(base / "shards" / manifest.entity), tex_size=256, nlatent=32, train_batch_size=2,
        val_batch_size=4, n_worker=0, device="cpu", result_path=str(base / "run"), test_segment_config=str(segment),
    )  # fmt: skip
    Trainer(config, init_distributed("cpu")).save(best=True)
    return {"checkpoint": base / "run" / BEST, "base": base, "cameras": manifest.cameras}


def visualize_cli(*argv: str) -> dict:
    """Run ``multiface visualize`` in-process through its ``register`` parser; return visualize.json."""
    parser = argparse.ArgumentParser(prog="multiface")
    visualize.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["visualize", *argv])
    assert args.func(args) == 0
    return json.loads((Path(args.out) / "visualize.json").read_text())


def test_frames_and_gif_for_the_chosen_expression_and_camera(run, tmp_path):
    """Pins the outputs for one (expression, camera): N composite PNG frames in frame order, each
    panel alone, a GIF of exactly N frames, nothing for the cameras not chosen, and an honest
    note that without a renderer the prediction is shown in texture space."""
    camera = run["cameras"][1]
    out = tmp_path / "out"
    summary = visualize_cli(
        "--model_ckpt", str(run["checkpoint"]), "--out", str(out), "--expressions", TEST_EXPRESSION,
        "--cameras", camera, "--frames", "2", "--rows", "64", "--device", "cpu",
    )  # fmt: skip
    assert summary["prediction"].startswith("texture space: no renderer")
    [sequence] = summary["sequences"]
    assert (sequence["expression"], sequence["camera"]) == (TEST_EXPRESSION, camera)
    frames = sequence["frames"]
    assert len(frames) == 2 and frames == sorted(frames)
    folder = out / TEST_EXPRESSION / camera
    for frame in frames:
        composite = np.asarray(Image.open(folder / f"{frame}.png"))
        assert composite.shape[0] > 64 and composite.shape[1] > 3 * 64 and composite.std() > 0
        for panel in ("photo", "pred_tex", "true_tex", "diff_tex"):
            assert (folder / f"{frame}-{panel}.png").is_file(), panel
    assert sorted(path.name for path in (out / TEST_EXPRESSION).iterdir()) == [camera]
    with Image.open(sequence["gif"]) as gif:
        assert gif.n_frames == 2
        assert gif.size == Image.open(folder / f"{frames[0]}.png").size


def test_defaults_are_the_test_expressions_and_the_visual_cameras(run, tmp_path):
    """Pins the defaults: the test split's expressions and the camera config's "visual" cameras,
    and ``--frames`` larger than an expression's frame count giving all its frames."""
    visual = run["cameras"][0]
    camera_config = tmp_path / "cameras.json"
    camera_config.write_text(
        json.dumps({"full": {"train": run["cameras"], "test": run["cameras"], "visual": [visual]}})
    )
    summary = visualize_cli(
        "--model_ckpt", str(run["checkpoint"]), "--out", str(tmp_path / "out"), "--camera_config",
        str(camera_config), "--frames", "10", "--rows", "32", "--device", "cpu",
    )  # fmt: skip
    assert [(item["expression"], item["camera"], len(item["frames"])) for item in summary["sequences"]] == [
        (TEST_EXPRESSION, visual, 3)
    ]


def test_unknown_camera_is_refused_with_the_choices(run, tmp_path):
    """Pins a ValueError naming the unknown camera and the entity's cameras, not an empty output."""
    with pytest.raises(ValueError, match=r"--cameras 999999: not in the shards .*choose from"):
        visualize_cli("--model_ckpt", str(run["checkpoint"]), "--out", str(tmp_path), "--cameras", "999999")


@pytest.mark.gpu
def test_rendered_prediction_beside_the_photo(run, tmp_path, renderer_factory):
    """Pins the CUDA path: the model is rendered into the camera (photo | pred | diff panels)."""
    renderer_factory()
    out = tmp_path / "out"
    summary = visualize_cli(
        "--model_ckpt",
        str(run["checkpoint"]),
        "--out",
        str(out),
        "--frames",
        "2",
        "--rows",
        "64",
        "--device",
        "cuda",
    )
    assert summary["prediction"] == "rendered (nvdiffrast)"
    sequence = summary["sequences"][0]
    folder = out / sequence["expression"] / sequence["camera"]
    frame = sequence["frames"][0]
    assert all((folder / f"{frame}-{panel}.png").is_file() for panel in ("photo", "pred", "diff"))
    assert np.asarray(Image.open(folder / f"{frame}-pred.png")).max() > 0
