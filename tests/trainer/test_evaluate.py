"""``multiface test`` (trainer.evaluate) on a synthetic entity: our checkpoints and published-style
state dicts, one row per test expression plus overall, deterministic protocol ``mean``, the
reference's ``seed`` protocol, two gloo ranks agreeing with one, and the PSNR formula."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shards.errors import IntegrityError
from shards.manifest import load_manifest
from trainer import evaluate
from trainer.checkpointing import BEST
from trainer.config import TrainConfig
from trainer.distributed import init_distributed
from trainer.loop import Trainer

ROOT = Path(__file__).resolve().parents[2]
TEST_EXPRESSIONS = ["E061_Lips_Puffed", "SEN_approach_your_interview_with_statuesque_composure"]
NUM_TEST = 8  # 2 test expressions x 2 frames x 2 cameras


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """Synthetic entity -> shards -> our best_model.pt (fresh weights, written by the Trainer)."""
    from shards.ingest import ingest
    from shards.synth import synthesize

    base = tmp_path_factory.mktemp("evaluate")
    entity = synthesize(
        base / "raw", expressions=3, frames=2, cameras=2, photo_size=(32, 24), tex_size=64, seed=5
    )
    manifest = ingest(entity, base / "shards", shard_size=2_000_000)
    segment = base / "segment.json"
    segment.write_text(json.dumps({"segment": ["E061", "SEN_"]}))
    shards = base / "shards" / manifest.entity
    config = TrainConfig(
        shards=str(shards), tex_size=256, nlatent=32, train_batch_size=2, val_batch_size=4, n_worker=0,
        device="cpu", result_path=str(base / "run"), test_segment_config=str(segment), seed=1,
    )  # fmt: skip
    Trainer(config, init_distributed("cpu")).save(best=True)
    return {"shards": shards, "segment": segment, "checkpoint": base / "run" / BEST, "base": base}


def evaluate_cli(checkpoint: Path, output: Path, *extra: str) -> dict:
    """Run ``multiface test`` in-process through its ``register`` parser; return metrics.json."""
    parser = argparse.ArgumentParser(prog="multiface")
    evaluate.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["test", "--model_ckpt", str(checkpoint), "--output", str(output), *extra])
    assert args.func(args) == 0
    return json.loads((output / "metrics.json").read_text())


def test_our_checkpoint_gives_one_row_per_test_expression_deterministically(run, tmp_path):
    """Pins the table (one row per test expression plus overall, every test sample once, finite
    values, screen loss n/a on CPU, tex_loss_8bit = tex_loss * texstd^2), that protocol mean
    gives identical numbers twice, and ``--val_num`` as a batch limit (an expression it never
    reaches shows n/a); our checkpoint alone supplies shards, split and model sizes."""
    first = evaluate_cli(run["checkpoint"], tmp_path / "first")
    rows = first["rows"]
    assert [row["expression"] for row in rows] == [*TEST_EXPRESSIONS, "overall"]
    assert [row["samples"] for row in rows] == [4, 4, NUM_TEST] and first["test_samples"] == NUM_TEST
    for row in rows:
        for name in ("vert_loss", "tex_loss", "tex_loss_8bit", "psnr_db"):
            assert math.isfinite(row[name]), (name, row)
        assert row["screen_loss"] is None
        assert row["tex_loss_8bit"] == pytest.approx(row["tex_loss"] * first["texstd"] ** 2, rel=1e-12)
    overall = sum(row["tex_loss"] * row["samples"] for row in rows[:-1]) / NUM_TEST
    assert rows[-1]["tex_loss"] == pytest.approx(overall, rel=1e-12)
    assert (first["arch"], first["tex_size"], first["nlatent"]) == ("base", 256, 32)
    table = (tmp_path / "first" / "metrics.md").read_text()
    assert table.count("\n") == 2 + len(rows) and "| n/a |" in table
    assert (tmp_path / "first" / "metrics.csv").read_text().splitlines()[0].startswith("expression,samples")
    second = evaluate_cli(run["checkpoint"], tmp_path / "second")
    assert second["rows"] == rows
    limited = evaluate_cli(run["checkpoint"], tmp_path / "limited", "--val_num", "1")["rows"]
    assert [row["samples"] for row in limited] == [4, 0, 4] and limited[1]["tex_loss"] is None


def test_published_state_dict_with_module_prefix_gives_the_same_numbers(run, tmp_path):
    """Pins loading a published-style checkpoint (plain state dict, ``module.`` keys, no config):
    architecture and sizes read off its shapes, the same numbers as our checkpoint, and clear
    errors for a missing --shards and for an override that does not fit the weights."""
    ours = evaluate_cli(run["checkpoint"], tmp_path / "ours")
    state = torch.load(run["checkpoint"], weights_only=False)["model"]
    published = tmp_path / "best_model.pth"
    torch.save({f"module.{name}": value for name, value in state.items()}, published)
    flags = ("--shards", str(run["shards"]), "--test_segment_config", str(run["segment"]), "--n_worker", "0")
    theirs = evaluate_cli(published, tmp_path / "theirs", *flags)
    assert theirs["rows"] == ours["rows"]
    with pytest.raises(ValueError, match="--shards is required"):
        evaluate_cli(published, tmp_path / "no-shards")
    with pytest.raises(ValueError, match="does not fit the model"):
        evaluate_cli(published, tmp_path / "wrong", *flags, "--nlatent", "64")


def test_seed_protocol_fits_on_the_test_set_and_measures_every_sample_once(run, tmp_path):
    """Pins ``--protocol seed``: it updates the encoder and colour correction (numbers differ from
    protocol mean), measures every test sample exactly once and leaves the checkpoint file as it was."""
    digest = hashlib.sha256(run["checkpoint"].read_bytes()).hexdigest()
    mean = evaluate_cli(run["checkpoint"], tmp_path / "mean")
    seed = evaluate_cli(
        run["checkpoint"], tmp_path / "seed", "--protocol", "seed", "--val_num", "1", "--lr", "1e-3"
    )
    assert seed["protocol"] == "seed" and seed["rows"][-1]["samples"] == NUM_TEST
    assert all(math.isfinite(row["tex_loss"]) for row in seed["rows"])
    assert seed["rows"][-1]["tex_loss"] != mean["rows"][-1]["tex_loss"]
    assert hashlib.sha256(run["checkpoint"].read_bytes()).hexdigest() == digest


def test_masked_psnr_matches_hand_computation():
    """Pins masked PSNR: MSE over the mask's texels only (weighted), peak 255, prediction clamped to
    [0, 255], NaN for an empty mask and capped for a perfect prediction."""
    generator = torch.Generator().manual_seed(0)
    true = torch.rand(3, 3, 4, 4, generator=generator, dtype=torch.float64) * 255
    pred = true + torch.randn(3, 3, 4, 4, generator=generator, dtype=torch.float64) * 7
    pred[0, 0, 0, 0] = 300.0  # clamped to 255 before the error
    mask = (torch.rand(3, 3, 4, 4, generator=generator) > 0.4).float()
    mask[1] = 0.0
    pred[2], mask[2] = true[2], 1.0
    got = evaluate.masked_psnr(pred, true, mask)
    clamped = pred.clamp(0, 255)
    seen = mask[0] > 0
    mse = sum(float(d) ** 2 for d in (clamped[0] - true[0])[seen]) / int(seen.sum())
    assert float(got[0]) == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-9)
    assert math.isnan(float(got[1]))
    assert float(got[2]) == pytest.approx(evaluate.PSNR_MAX_DB)


def torchrun_evaluate(checkpoint: Path, output: Path, *extra: str) -> dict:
    """``python -m trainer.evaluate`` on two gloo ranks; return rank 0's metrics.json."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
        "trainer.evaluate", "--model_ckpt", str(checkpoint), "--output", str(output), "--device", "cpu", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((output / "metrics.json").read_text())


def test_two_ranks_agree_with_one(run, tmp_path):
    """Pins multi-rank evaluation under torchrun: the ranks split the test shards, metrics are
    all-reduced (sums and counts), rank 0 writes, and the table equals the one-rank table."""
    single = evaluate_cli(run["checkpoint"], tmp_path / "single", "--device", "cpu")
    two = torchrun_evaluate(run["checkpoint"], tmp_path / "two")
    assert two["ranks"] == 2
    for got, want in zip(two["rows"], single["rows"], strict=True):
        assert got["samples"] == want["samples"]
        for name in ("vert_loss", "tex_loss", "tex_loss_8bit", "psnr_db"):
            assert got[name] == pytest.approx(want[name], rel=1e-5), (name, got, want)


def test_two_ranks_seed_protocol_with_uneven_shards_finishes(run, tmp_path):
    """Pins the seed protocol's collectives: with 3 test shards on 2 ranks one rank runs out of
    batches first and must keep joining the gradient average (a rank that left would hang the
    other), and every test sample is still measured exactly once."""
    segment = tmp_path / "all.json"
    segment.write_text(json.dumps({"segment": ["E0", "SEN_"]}))
    flags = (
        "--protocol",
        "seed",
        "--val_num",
        "1",
        "--val_batch_size",
        "3",
        "--test_segment_config",
        str(segment),
    )
    result = torchrun_evaluate(run["checkpoint"], tmp_path / "seed", *flags)
    assert [row["samples"] for row in result["rows"]] == [4, 4, 4, 12]
    assert all(math.isfinite(row["tex_loss"]) for row in result["rows"])


def test_tampered_test_shard_stops_evaluation(run, tmp_path):
    """Pins that a test shard failing its sha256 raises instead of shrinking the test set silently."""
    copy = tmp_path / run["shards"].name
    shutil.copytree(run["shards"], copy)
    victim = next(shard for shard in load_manifest(copy).shards if "E061_Lips_Puffed" in shard.expressions)
    data = bytearray((copy / victim.name).read_bytes())
    data[1000] ^= 0x01
    (copy / victim.name).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="refusing this shard"):
        evaluate_cli(run["checkpoint"], tmp_path / "out", "--shards", str(copy))


@pytest.mark.gpu
def test_screen_loss_is_measured_with_a_renderer(run, tmp_path, renderer_factory):
    """Pins the screen-loss column on CUDA + nvdiffrast: a finite number, not n/a."""
    renderer_factory()
    result = evaluate_cli(run["checkpoint"], tmp_path / "gpu", "--device", "cuda", "--lambda_screen", "1")
    assert result["screen_loss"] == "measured"
    assert all(math.isfinite(row["screen_loss"]) for row in result["rows"])
