"""What receiving one batch message from a DataLoader worker costs the training thread.

``trainer.feeder.RingBatches`` sends the images through shared slots and only small fields in
the message. A tensor among them crosses the process boundary as a shared-memory file
descriptor (a socket round trip to the worker per tensor); the same values pickled inline do
not. This measures the training thread's CPU time (``time.thread_time``) per received message,
both ways, alternated twice in one run::

    python bench/bench_message.py [--messages 2000] [--workers 2]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from trainer.feeder import InlineArray


class Messages(torch.utils.data.IterableDataset):
    """Endless messages shaped like the ring's: 16 camera indices, 16 strings, a slot number."""

    def __init__(self, inline: bool):
        super().__init__()
        self.inline = inline

    def __iter__(self):
        cameras = torch.arange(16)
        while True:
            cam = InlineArray(cameras.numpy().copy()) if self.inline else cameras.clone()
            yield {"worker": 0, "slot": 1, "rest": {"cam": cam, "exp": ["E057_Cheeks_Puffed"] * 16}}


def per_message_us(inline: bool, messages: int, workers: int) -> tuple[float, float]:
    loader = torch.utils.data.DataLoader(Messages(inline), batch_size=None, num_workers=workers)
    iterator = iter(loader)
    for _ in range(50):
        next(iterator)
    cpu, wall = time.thread_time(), time.perf_counter()
    for _ in range(messages):
        message = next(iterator)
        cam = message["rest"]["cam"]
        if isinstance(cam, InlineArray):
            cam = torch.from_numpy(cam.array)
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    del iterator
    return 1e6 * cpu / messages, 1e6 * wall / messages


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, torch {torch.__version__}; {args.workers} workers, {args.messages} messages"
    )
    print("| small fields sent as | training thread CPU us/message | wall us/message |")
    print("|---|---|---|")
    for inline in (False, True, False, True):
        cpu, wall = per_message_us(inline, args.messages, args.workers)
        print(
            f"| {'inline bytes (InlineArray)' if inline else 'a tensor (file descriptor)'} | {cpu:.0f} | {wall:.0f} |"
        )


if __name__ == "__main__":
    main()
