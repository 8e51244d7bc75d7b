"""``multiface demo``: the whole pipeline on one machine, in a few minutes.

    multiface demo [--out demo-output] [--entity ENTITY_DIR] [--steps N] [--nproc 2]

Synthesises an entity (or takes a downloaded one), starts the data service on a free loopback
port, ingests through its API with a progress bar, trains with ``--nproc`` ranks under torchrun
streaming the shards over HTTP (gloo on CPU; NCCL and the screen loss with a GPU), evaluates,
prints the loss table and where images and TensorBoard logs are, and stops the service.

Every stage is a ``multiface`` command or an HTTP call, so this module needs none of the other
packages' code: only that the ``data`` and ``train`` extras are installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tqdm import tqdm

TEST_EXPRESSION = "E061_Lips_Puffed"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole pipeline: synth, serve, ingest, train, evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default demo-output)")
    parser.add_argument("--entity", type=Path, help="a downloaded entity folder to use instead of a synthetic one")
    parser.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    parser.add_argument("--nproc", type=int, default=2, help="training ranks under torchrun (default 2)")
    parser.add_argument("--tex-size", type=int, default=None, help="model texture size (default 256 on CPU, 1024 on GPU)")
    parser.set_defaults(func=run)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _call(url: str, method: str = "GET", body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.monotonic()


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def run(args: argparse.Namespace) -> int:
    began = time.monotonic()
    out = args.out.resolve()
    if args.nproc < 1 or args.steps < 1:
        print("--nproc and --steps must be 1 or more", file=sys.stderr)
        return 2
    entities, shards, results = out / "entities", out / "shards", out / "run"
    for folder in (shards, results):
        shutil.rmtree(folder, ignore_errors=True)
    for folder in (entities, shards):
        folder.mkdir(parents=True, exist_ok=True)
    gpus = _gpu_count()
    device = "cuda" if gpus else "cpu"
    tex_size = args.tex_size or (1024 if gpus else 256)

    if args.entity:
        entity = args.entity.resolve()
        data_root = entity.parent
        _step(f"using the downloaded entity {entity}")
    else:
        _step("synthesising an entity (real layout, small images)")
        shutil.rmtree(entities, ignore_errors=True)
        command = [sys.executable, "-m", "shards.cli", "synth", str(entities), "--expressions", "3", "--frames", "6",
                   "--cameras", "4", "--photo-size", "256x168" if not gpus else "2048x1334",
                   "--tex-size", "256" if not gpus else "1024", "--seed", "5", "--workers", "2"]  # fmt: skip
        entity = Path(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip())
        data_root = entities
        print(entity)

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    _step(f"starting the data service on {base}")
    log = open(out / "service.log", "w")
    service = subprocess.Popen(
        [sys.executable, "-m", "shards.cli", "serve", "--data-root", str(data_root), "--shard-root", str(shards),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _call(f"{base}/api/v1/health")
                break
            except OSError:
                if service.poll() is not None or time.monotonic() > deadline:
                    print(f"the data service did not start; see {out / 'service.log'}", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        print(f"status page: {base}/   API docs: {base}/docs")
        return _pipeline(args, base, entity, results, device, tex_size, began)
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(timeout=20)
        except subprocess.TimeoutExpired:
            service.kill()
        log.close()
        print("data service stopped")


def _pipeline(args, base: str, entity: Path, results: Path, device: str, tex_size: int, began: float) -> int:
    _step(f"ingesting {entity.name} through the API")
    job = _call(f"{base}/api/v1/entities/{entity.name}/ingest", "POST", {})
    with tqdm(total=0, unit="sample", desc="ingest", dynamic_ncols=True) as bar:
        while job["state"] == "running":
            time.sleep(0.5)
            job = _call(f"{base}{job['url']}")
            progress = job["progress"]
            bar.total = progress.get("samples_total") or 0
            bar.n = progress.get("samples_done") or 0
            bar.set_postfix_str(f"{progress['bytes_per_second'] / 1e6:.1f} MB/s, {progress.get('num_excluded') or 0} excluded")
            bar.refresh()
    if job["state"] != "succeeded":
        print(f"ingest {job['state']}: {job.get('error')}", file=sys.stderr)
        return 1
    state = _call(f"{base}/api/v1/entities/{entity.name}")
    print(json.dumps({key: state[key] for key in state if key in ("ingest_state", "num_shards", "num_samples")}))

    segment = results.parent / "test_segment.json"
    segment.write_text(json.dumps({"segment": [TEST_EXPRESSION]}))
    manifest_url = f"{base}/api/v1/entities/{entity.name}/manifest.json"
    screen = ["--lambda_screen", "1", "--resolution", "2048", "1334"] if device == "cuda" else []
    common = ["--shards", manifest_url, "--test_segment_config", str(segment), "--tex_size", str(tex_size),
              "--device", device]  # fmt: skip
    _step(f"training {args.steps} steps on {args.nproc} {device} rank(s) under torchrun, streaming over HTTP")
    train = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
             "-m", "trainer.train", *common, "--result_path", str(results), "--max_iter", str(args.steps),
             "--nlatent", "64", "--train_batch_size", "2", "--val_batch_size", "2", "--lr", "1e-3",
             "--log_every", str(max(1, args.steps // 6)), "--val_every", str(max(1, args.steps // 2)),
             "--val_num", "3", "--n_worker", "1", *screen]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
    if subprocess.call(train, env=env) != 0:
        print("training failed", file=sys.stderr)
        return 1

    _step("evaluating the best checkpoint on the test expression")
    evaluate = [sys.executable, "-m", "trainer.evaluate", *common, "--model_ckpt", str(results / "best_model.pt"),
                "--output", str(results / "evaluation"), "--n_worker", "0"]  # fmt: skip
    if subprocess.call(evaluate, env=env) != 0:
        print("evaluation failed", file=sys.stderr)
        return 1
    print(f"\nimages and TensorBoard logs: {results / 'tensorboard'}  (tensorboard --logdir {results})")
    print(f"checkpoints: {results}   evaluation tables: {results / 'evaluation'}*")
    print(f"demo finished in {time.monotonic() - began:.0f} s")
    return 0
