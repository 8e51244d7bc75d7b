"""Batches from a :class:`trainer.data.ShardStream` decoded on threads and collated straight
into pinned host memory: the ``--loader threads`` alternative to DataLoader worker processes.

Why threads: the work of a sample (HTTP reads, sha256, zstd, the GPU path's uint8 images) runs
in C with the GIL released, so threads decode in parallel, and a batch never crosses a process
boundary. With worker processes every batch is written to fresh shared memory by a worker,
then page-faulted into the training process and copied once more into pinned memory by its
single pin-memory thread; for the screen-loss fields that is about 230 MB per batch of 16 on
one core of the training process, which caps the loader below what the workers decode
(``bench/bench_input.py``). Here each thread copies its samples once, into a pinned batch
buffer that the CUDA caching host allocator reuses.

Semantics match ``DataLoader(stream, batch_size, num_workers=threads)``: thread ``i`` reads the
stream's worker slot ``i`` of ``threads`` and fills whole batches from it, and batches come out
round-robin across threads, so a run sees the same samples in the same order as with that many
worker processes. An exception in a thread is raised in the consumer with its traceback.

Typical use::

    batches = ThreadedBatches(stream, batch_size=16, threads=12, pin_memory=True)
    for batch in batches:          # endless, like the stream
        batch = to_device(batch, device)
    batches.close()
"""

from __future__ import annotations

import numbers
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from trainer.data import ShardStream

_POLL_SECONDS = 0.2


class _Failed:
    """A thread's exception, passed through its queue to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


def collate(samples: Sequence[dict], pin_memory: bool = False) -> dict[str, Any]:
    """Stack samples like ``torch.utils.data.default_collate``, each array copied once into its
    (optionally pinned) batch tensor: arrays -> (N, ...) tensors, numbers -> (N,) tensors, strings
    -> lists."""
    first = samples[0]
    batch: dict[str, Any] = {}
    for name, value in first.items():
        values = [sample[name] for sample in samples]
        if isinstance(value, np.ndarray):
            array = np.asarray(value)
            out = torch.empty((len(values), *array.shape), dtype=torch.from_numpy(array[:0]).dtype,
                              pin_memory=pin_memory)  # fmt: skip
            for index, item in enumerate(values):
                out[index].copy_(torch.as_tensor(np.ascontiguousarray(item)))
            batch[name] = out
        elif isinstance(value, str):
            batch[name] = list(values)
        elif isinstance(value, numbers.Number):
            batch[name] = torch.tensor(values)
        else:
            batch[name] = torch.utils.data.default_collate(values)
    return batch


class ThreadedBatches:
    """Endless batches of ``stream`` from ``threads`` decoding threads (see the module docstring).

    Args:
        stream: the rank's sample stream.
        batch_size: samples per batch.
        threads: decoding threads (the stream's worker slots), at least 1.
        prefetch: batches each thread may hold ready.
        pin_memory: collate into pinned host memory (for non-blocking copies to a GPU).
    """

    def __init__(
        self, stream: ShardStream, batch_size: int, threads: int, prefetch: int = 2, pin_memory: bool = False
    ):
        if threads < 1:
            raise ValueError(f"threads {threads}: use 1 or more")
        self.batch_size = batch_size
        self.pin_memory = pin_memory
        self._stop = threading.Event()
        self._queues: list[queue.Queue] = [queue.Queue(maxsize=max(1, prefetch)) for _ in range(threads)]
        self._threads = [
            threading.Thread(
                target=self._fill,
                args=(stream.for_worker(index, threads), self._queues[index]),
                name=f"shard-decoder-{index}",
                daemon=True,
            )  # fmt: skip
            for index in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _put(self, target: queue.Queue, item: object) -> bool:
        while not self._stop.is_set():
            try:
                target.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, stream: ShardStream, target: queue.Queue) -> None:
        try:
            samples: list[dict] = []
            for sample in stream:
                if self._stop.is_set():
                    return
                samples.append(sample)
                if len(samples) == self.batch_size:
                    if not self._put(target, collate(samples, self.pin_memory)):
                        return
                    samples = []
        except BaseException as error:  # handed to the consumer, which raises it
            self._put(target, _Failed(error))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        index = 0
        while True:
            source = self._queues[index]
            while True:
                try:
                    item = source.get(timeout=_POLL_SECONDS)
                    break
                except queue.Empty:
                    if not self._threads[index].is_alive() and source.empty():
                        raise RuntimeError(
                            f"{self._threads[index].name} stopped without a batch or an error"
                        ) from None
            if isinstance(item, _Failed):
                self.close()
                raise item.error
            yield item
            index = (index + 1) % len(self._queues)

    def close(self) -> None:
        """Stop the threads (each finishes the sample it is decoding) and drop ready batches."""
        self._stop.set()
        for target in self._queues:
            while not target.empty():
                target.get_nowait()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=30)
