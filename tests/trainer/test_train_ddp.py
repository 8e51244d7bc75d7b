"""Two-rank gloo DDP training under torchrun, streaming a synthetic entity from a live data
service on loopback: equal steps on every rank with an odd shard count, falling loss, resume
after SIGKILL at the same step and state, and a tampered shard refused."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from shards.ingest import ingest
from shards.manifest import load_manifest
from trainer.checkpointing import CHECKPOINT, state_digest

ROOT = Path(__file__).resolve().parents[2]
TEST_EXPRESSION = "E061_Lips_Puffed"


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory) -> Path:
    from shards.synth import synthesize

    base = tmp_path_factory.mktemp("ddp")
    entity = synthesize(
        base / "raw", expressions=4, frames=3, cameras=2, photo_size=(64, 48), tex_size=64, seed=3
    )
    manifest = ingest(entity, base / "shards", shard_size=2_000_000)
    train = [shard for shard in manifest.shards if TEST_EXPRESSION not in shard.expressions]
    assert len(train) % 2 == 1, f"the test needs an odd number of training shards, got {len(train)}"
    (base / "segment.json").write_text(json.dumps({"segment": [TEST_EXPRESSION]}))
    return base


@contextlib.contextmanager
def data_service(data_root: Path, shard_root: Path):
    """A real ``multiface serve`` on a free loopback port; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "shards.cli", "serve", "--data-root", str(data_root), "--shard-root", str(shard_root),
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/v1/health", timeout=2).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, (
                    "the data service did not start"
                )
                time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def manifest_url(base: str, shard_folder: Path) -> str:
    return f"{base}/api/v1/entities/{shard_folder.name}/manifest.json"


def torchrun(shards: str, result: Path, segment: Path, *extra: str, nproc: int = 2) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "trainer.train", "--shards", shards, "--result_path", str(result), "--test_segment_config", str(segment),
        "--tex_size", "256", "--nlatent", "32", "--train_batch_size", "2", "--val_batch_size", "2",
        "--lr", "1e-3", "--log_every", "2", "--val_num", "2", "--n_worker", "1", "--device", "cpu", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (torchrun starts its workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    stack, found = [pid], []
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(children.get(current, []))
    for target in found:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


def losses(output: str, kind: str) -> list[float]:
    return [
        float(value) for value in re.findall(rf"^{kind}\s+\d+: .*?tex_loss ([0-9.]+)", output, re.MULTILINE)
    ]


def test_two_ranks_same_steps_loss_falls_and_resume(shard_root, tmp_path):
    """Pins DDP hygiene: both ranks run the same number of steps with an odd shard count (no
    end-of-epoch hang), the texture loss falls, and a run killed with SIGKILL resumes from its
    checkpoint at the same step with the same model state."""
    with data_service(shard_root / "raw", shard_root / "shards") as base:
        run_with_service(manifest_url(base, next((shard_root / "shards").iterdir())), shard_root, tmp_path)


def run_with_service(folder: str, shard_root: Path, tmp_path: Path) -> None:
    result = tmp_path / "run"
    output = finish(
        torchrun(folder, result, shard_root / "segment.json", "--max_iter", "24", "--val_every", "12")
    )
    steps = re.findall(r"rank (\d): (\d+) steps", output)
    assert sorted(steps) == [("0", "24"), ("1", "24")], output[-3000:]
    validation = losses(output, "val")
    assert len(validation) == 2 and validation[-1] < validation[0], output[-3000:]

    killed = torchrun(
        folder, tmp_path / "killed", shard_root / "segment.json", "--max_iter", "400", "--val_every", "4"
    )
    checkpoint = tmp_path / "killed" / CHECKPOINT
    deadline = time.monotonic() + 300
    while not checkpoint.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    kill_tree(killed.pid)
    killed.wait()
    saved = torch.load(checkpoint, weights_only=False)
    resumed = finish(
        torchrun(
            folder,
            tmp_path / "killed",
            shard_root / "segment.json",
            "--resume",
            "--max_iter",
            str(saved["step"] + 2),
            "--val_every",
            "4",
        )
    )
    assert (
        f"resumed at step {saved['step']}, epoch {saved['epoch']} (model sha256 {state_digest(saved['model'])[:16]})"
        in resumed
    )
    assert re.findall(r"rank \d: (\d+) steps", resumed) == [str(saved["step"] + 2)] * 2


def test_tampered_shard_is_refused(shard_root, tmp_path):
    """Pins that a shard whose sha256 differs from the manifest is refused and reported, never
    trained on (through the batch ring, --loader ring, the default of CUDA runs with --gpu_normalise)."""
    source = next((shard_root / "shards").iterdir())
    copy = tmp_path / "shards" / source.name
    copy.parent.mkdir()
    subprocess.run(["cp", "-r", str(source), str(copy)], check=True)
    manifest = load_manifest(copy)
    victim = next(shard for shard in manifest.shards if TEST_EXPRESSION not in shard.expressions)
    data = bytearray((copy / victim.name).read_bytes())
    data[1000] ^= 0x01
    (copy / victim.name).write_bytes(bytes(data))
    # One rank: with two, the rank whose only shard is the tampered one would (rightly) stop the job.
    with data_service(shard_root / "raw", copy.parent) as base:
        output = finish(
            torchrun(
                manifest_url(base, copy),
                tmp_path / "run",
                shard_root / "segment.json",
                "--max_iter",
                "4",
                "--val_every",
                "4",
                "--loader",
                "ring",
                nproc=1,
            )
        )
    assert f"refused shard {victim.name}" in output and "rank 0: 4 steps" in output


def test_two_nodes_c10d_rendezvous(shard_root, tmp_path):
    """Pins multi-node training through torchrun's own rendezvous (no home-made launcher): two
    torchrun agents as two nodes (--nnodes=2, c10d on 127.0.0.1, one gloo rank each) train from one
    data service and both ranks run the same number of steps."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        rendezvous_port = probe.getsockname()[1]
    with data_service(shard_root / "raw", shard_root / "shards") as base:
        url = manifest_url(base, next((shard_root / "shards").iterdir()))
        agents = []
        for node in range(2):
            command = [
                sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{rendezvous_port}", "--rdzv_id=two-nodes",
                "-m", "trainer.train", "--shards", url, "--result_path", str(tmp_path / f"node{node}"),
                "--test_segment_config", str(shard_root / "segment.json"), "--tex_size", "256", "--nlatent", "32",
                "--train_batch_size", "2", "--val_batch_size", "2", "--max_iter", "4", "--val_every", "4",
                "--log_every", "2", "--val_num", "1", "--n_worker", "0", "--device", "cpu",
            ]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
            agents.append(
                subprocess.Popen(
                    command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
            )
        outputs = [finish(agent) for agent in agents]
    steps = sorted(re.findall(r"rank (\d): (\d+) steps", "".join(outputs)))
    assert steps == [("0", "4"), ("1", "4")], outputs
    assert "on 2 rank(s)" in "".join(outputs)


@pytest.mark.multigpu
def test_two_gpus_nccl_with_screen_loss(shard_root, tmp_path):
    """Pins DDP on two GPUs: torchrun starts one NCCL rank per GPU, both stream the entity from a
    live data service on loopback, train with the nvdiffrast screen loss on, run the same number of
    steps with finite, positive screen losses, and rank 0 writes a complete checkpoint.

    Run on a machine with two GPUs: ``REQUIRE_GPU=1 python -m pytest tests/trainer -m multigpu``."""
    import importlib.util

    problem = None
    if torch.cuda.device_count() < 2:
        problem = f"two CUDA devices are needed, torch sees {torch.cuda.device_count()}"
    elif importlib.util.find_spec("nvdiffrast") is None:
        problem = "nvdiffrast is not installed"
    if problem is not None:
        if os.environ.get("REQUIRE_GPU") == "1":
            pytest.fail(f"REQUIRE_GPU=1 but {problem}", pytrace=False)
        pytest.skip(problem)
    result = tmp_path / "run"
    with data_service(shard_root / "raw", shard_root / "shards") as base:
        url = manifest_url(base, next((shard_root / "shards").iterdir()))
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "trainer.train", "--shards", url, "--result_path", str(result),
            "--test_segment_config", str(shard_root / "segment.json"), "--tex_size", "256", "--nlatent", "32",
            "--train_batch_size", "2", "--val_batch_size", "2", "--lr", "1e-3", "--max_iter", "12",
            "--val_every", "6", "--log_every", "2", "--val_num", "2", "--n_worker", "1", "--device", "cuda",
            "--lambda_screen", "1", "--resolution", "64", "48",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "NCCL_DEBUG": "VERSION"}
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        output = finish(process)
    print(output[-3000:])
    assert "on 2 rank(s), device cuda" in output, output[-3000:]
    assert "NCCL version" in output, output[-3000:]
    assert sorted(re.findall(r"rank (\d): (\d+) steps", output)) == [("0", "12"), ("1", "12")], output[-3000:]
    screen = [
        float(value)
        for value in re.findall(r"^step\s+\d+: .*?screen_loss ([0-9.eE+-]+)", output, re.MULTILINE)
    ]
    assert screen and all(0.0 < value < float("inf") for value in screen), output[-3000:]
    saved = torch.load(result / CHECKPOINT, weights_only=False, map_location="cpu")
    assert saved["step"] == 12
