"""A DDP rank killed, and a rank's data stream stalled, under torchrun: RELIABILITY.md rows 22 and 23.

Two gloo ranks on CPU run the same command torchrun would rerun (``--resume`` always passed,
``--max-restarts`` through torchrun's ``PET_MAX_RESTARTS`` variable), built by ``torchrun()``
of ``tests/trainer/test_train_ddp.py`` on that module's synthetic entity.

- Row 22: rank 0 (the only checkpoint writer, so the checkpoint on disk cannot move after the
  kill) is SIGKILLed after the first checkpoint; torchrun must restart the workers and they must
  resume at that checkpoint's step and model state, then finish with equal steps on both ranks.
- Row 23: both ranks read through ``tests/services/fault_proxy.py``; from the first checkpoint on
  every connection stalls after 4 KiB (a server that stops sending, again after each resume).
  With ``--stall_timeout 5 --collective_timeout 20`` the job must fail and be restarted by
  torchrun within a bound far under NCCL's 10-minute watchdog; with the stall lifted the
  restarted job resumes and finishes. (Both ranks, not one: the trainer has no per-rank data
  URL, and a stall of every rank is the harder case, as no rank waits in a collective.)
  The ``slow`` variant stalls one file mid-body once per connection: the download must be
  retried with Range and the job finish without a restart.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from fault_proxy import FaultProxy
from service_harness import LiveServer, settings_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
import test_train_ddp  # noqa: E402
from test_train_ddp import kill_tree, torchrun  # noqa: E402

from trainer.checkpointing import CHECKPOINT, state_digest  # noqa: E402

ddp_entity = test_train_ddp.shard_root
"""The synthetic entity, its shards and segment.json of the DDP tests (their module-scoped fixture)."""

NCCL_DEFAULT_TIMEOUT = 600.0
FAIL_BOUND = 150.0
"""Seconds from the stall to torchrun's restart: stall timeout, collective timeout, teardown and
slack for a loaded 2-core machine; a hang would take NCCL's 600."""


class Run:
    """A torchrun job whose output is read in a thread (so the pipe never fills)."""

    def __init__(self, process):
        self.process = process
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout)
        except BaseException:
            kill_tree(self.process.pid)
            raise
        self.reader.join(10)
        return code

    def workers(self) -> dict[int, int]:
        """{rank: pid} of torchrun's worker processes: its children with RANK in their environment."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                environ = (entry / "environ").read_bytes().split(b"\0") if parent == self.process.pid else []
            except (OSError, ValueError):
                continue
            for item in environ:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = int(entry.name)
        return found


def _wait_for(predicate, timeout: float, what: str, run: Run):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        assert run.process.poll() is None, f"the job ended before {what}:\n{run.output[-4000:]}"
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout} s:\n{run.output[-4000:]}")


def _folder(ddp_entity: Path) -> Path:
    return next((ddp_entity / "shards").iterdir())


def _resumed_line(saved: dict) -> str:
    return f"resumed at step {saved['step']}, epoch {saved['epoch']} (model sha256 {state_digest(saved['model'])[:16]})"


def _steps(output: str, max_iter: int) -> None:
    for rank in (0, 1):
        assert f"rank {rank}: {max_iter} steps" in output, output[-4000:]


def test_killed_rank_restarts_and_resumes_at_the_checkpoint(ddp_entity, tmp_path, monkeypatch, figure):
    """Pins row 22: a SIGKILLed rank must make torchrun (--max-restarts=1) restart the workers,
    which resume from the last checkpoint at its step with its model state (not step 0, not a
    later step) and finish with the same number of steps on every rank."""
    monkeypatch.setenv("PET_MAX_RESTARTS", "1")
    result, max_iter = tmp_path / "run", 12
    started = time.monotonic()
    run = Run(torchrun(str(_folder(ddp_entity)), result, ddp_entity / "segment.json", "--resume",
                       "--max_iter", str(max_iter), "--val_every", "4"))  # fmt: skip
    try:
        checkpoint = result / CHECKPOINT
        _wait_for(checkpoint.is_file, 300, "first checkpoint", run)
        victim = _wait_for(lambda: run.workers().get(0), 30, "rank 0 worker", run)
        kill_tree(victim)
        saved = torch.load(checkpoint, weights_only=False)  # rank 0 alone writes it: frozen now
        code = run.wait(240)
    finally:
        kill_tree(run.process.pid)
    output = run.output
    assert code == 0, output[-4000:]
    assert "--resume: no" in output, "the first attempt did not start from scratch"
    assert _resumed_line(saved) in output, (_resumed_line(saved), output[-4000:])
    _steps(output, max_iter)
    figure("trainer.rank_killed.resumed_at_step", saved["step"])
    figure("trainer.rank_killed.restarts", 1)
    figure("trainer.rank_killed.wall_seconds", round(time.monotonic() - started, 1))


class StallSwitch:
    """A fault list for ``FaultProxy``: while armed, every new connection stalls after N bytes.

    The proxy asks ``faults[i]`` for its i-th connection; this answers ``("stall", N)`` while
    armed and None (forward untouched) otherwise.
    """

    def __init__(self, after_bytes: int):
        self.after_bytes = after_bytes
        self.armed = threading.Event()
        self.num_stalled = 0

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, number: int):
        if not self.armed.is_set():
            return None
        self.num_stalled += 1
        return ("stall", self.after_bytes)


def _proxied_run(ddp_entity: Path, result: Path, switch: StallSwitch, max_iter: int, scenario):
    """Run the job with both ranks reading through a stall proxy; ``scenario(run, proxy)`` drives it."""
    raw, shards = ddp_entity / "raw", ddp_entity / "shards"
    with LiveServer(settings_for(raw, shards)) as server, FaultProxy(server.port, []) as proxy:
        proxy.faults = switch
        url = f"{proxy.url}/api/v1/entities/{_folder(ddp_entity).name}/manifest.json"
        run = Run(torchrun(url, result, ddp_entity / "segment.json", "--resume", "--max_iter", str(max_iter),
                           "--val_every", "4", "--stall_timeout", "5", "--collective_timeout", "20"))  # fmt: skip
        try:
            return run, scenario(run, proxy)
        finally:
            kill_tree(run.process.pid)


def test_stalled_stream_fails_fast_and_torchrun_restarts(ddp_entity, tmp_path, monkeypatch, figure):
    """Pins row 23: with the data service stalling every connection (after 4 KiB, again after
    each resume) the ranks block on their streams; the job must fail within FAIL_BOUND seconds,
    far under NCCL's 600 (a stalled download gives up after its retries of 5 s each, a rank
    waiting in a collective after 20 s), and torchrun must restart it; the restarted job (stall
    lifted) resumes from the last checkpoint and finishes. A client that counted the few bytes
    each stalled attempt brought as progress kept the job hanging here: both ranks stuck on
    data, none in a collective."""
    monkeypatch.setenv("PET_MAX_RESTARTS", "1")
    result, max_iter = tmp_path / "run", 12  # validation at step 8 refetches metadata: sure to stall
    switch = StallSwitch(after_bytes=4096)

    def scenario(run: Run, proxy: FaultProxy):
        checkpoint = result / CHECKPOINT
        _wait_for(checkpoint.is_file, 300, "first checkpoint", run)
        first = _wait_for(run.workers, 30, "workers", run)
        switch.armed.set()
        stalled_at = time.monotonic()
        _wait_for(lambda: (now := run.workers()) and set(now.values()).isdisjoint(first.values()), FAIL_BOUND,
                  "restart after the stall", run)  # fmt: skip
        failed_in = time.monotonic() - stalled_at
        switch.armed.clear()
        # The last checkpoint of the failed attempt: its workers are gone, the new ones start up.
        saved = torch.load(checkpoint, weights_only=False)
        return run.wait(300), failed_in, saved

    run, (code, failed_in, saved) = _proxied_run(ddp_entity, result, switch, max_iter, scenario)
    output = run.output
    assert code == 0, output[-4000:]
    assert switch.num_stalled >= 1
    assert failed_in < FAIL_BOUND < NCCL_DEFAULT_TIMEOUT
    assert _resumed_line(saved) in output, (_resumed_line(saved), output[-4000:])
    _steps(output, max_iter)
    figure("trainer.stalled_stream.failed_and_restarted_after_seconds", round(failed_in, 1))
    figure("trainer.stalled_stream.connections_stalled", switch.num_stalled)
    figure("trainer.stalled_stream.resumed_at_step", saved["step"])


@pytest.mark.slow
def test_stalled_download_is_retried_without_a_restart(ddp_entity, tmp_path, monkeypatch, figure):
    """Pins rows 12 and 23 (transient stall): a file that stops mid-body (only the topology
    file is over 700 kB, so only its downloads stall, once per connection) must be resumed
    with Range after the 5 s stall timeout and the job finish without any restart."""
    monkeypatch.setenv("PET_MAX_RESTARTS", "0")
    result, max_iter = tmp_path / "run", 16
    switch = StallSwitch(after_bytes=700_000)

    def scenario(run: Run, proxy: FaultProxy):
        _wait_for((result / CHECKPOINT).is_file, 300, "first checkpoint", run)
        switch.armed.set()
        armed_at = time.monotonic()
        code = run.wait(240)
        return (
            code,
            time.monotonic() - armed_at,
            [head for head in proxy.requests if b"\r\nRange: bytes=" in head],
        )

    run, (code, after_arming, resumed) = _proxied_run(ddp_entity, result, switch, max_iter, scenario)
    assert code == 0, run.output[-4000:]
    assert resumed, "no stalled download was resumed: the stall never hit a transfer"
    assert "resumed at step" not in run.output
    _steps(run.output, max_iter)
    assert after_arming < FAIL_BOUND
    figure("trainer.transient_stall.downloads_resumed_with_range", len(resumed))
    figure("trainer.transient_stall.seconds_after_stall_to_finish", round(after_arming, 1))
