"""Batches from DataLoader worker processes through a shared, page-locked ring: ``--loader ring``.

Why: with a plain ``DataLoader(pin_memory=True)`` every batch a worker makes is written to fresh
shared memory, then page-faulted into the training process and copied once more into pinned
memory by that process's single pin-memory thread. For the screen-loss fields (a 2048 x 1334
photo and two 1024 textures per sample) that is about 230 MB per batch of 16 on one core, and
on an H200 host it capped the loader at 155-200 samples/s with no decoding at all, the training
process at 100% CPU (``bench/bench_input.py``; the same transfer through the ring: 850-1070).

How: each worker owns ``slots`` batch buffers per array field, in shared memory it allocates
once. It decodes a batch's images straight into its next slot (zstd into memory already
mapped is about twice as fast as into fresh memory) and sends only the slot number and the
small non-array fields. The training process maps each worker's buffers once (the first message
carries them), page-locks them with ``cudaHostRegister`` and copies a slot to the GPU with one
non-blocking copy per field, on a stream of its own so that the copy overlaps the previous
step's kernels. No per-batch page faults, no second host copy. The copy and the GPU finish
(``finish``) of a batch are queued one batch ahead, when the batch before it is handed out, so
they run beside that batch's step rather than between two steps. (The same work in a thread of
its own, off the training thread, was slower on an H200: 0.83-0.85x of the ceiling against
0.87-0.88x, the two threads contending for the GIL.)

Slot reuse is safe by construction: DataLoader hands a worker a new task each time the
training process receives one of its batches, tasks are dispatched and received round-robin
across workers, and a worker has ``prefetch + 2`` slots. So the slot a worker may overwrite next
belongs to a batch received at least ``num_workers`` receipts earlier; the consumer waits for
the copy events of batches that old before asking for the next one (in steady state those
copies finished long ago, so this never stalls).

The batches equal ``DataLoader(stream, batch_size, num_workers)``'s: the same samples in the same
order (each worker fills whole batches from its own slot of the stream), collated alike.

Typical use (training only; validation keeps a plain DataLoader)::

    batches = RingBatches(stream, batch_size=16, workers=12, device=torch.device("cuda"))
    for batch in batches:      # array fields already on the device
        ...
    batches.close()
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from trainer.data import ShardStream
from trainer.gpu_decode import IMAGE_FIELDS


class InlineArray:
    """A small array that crosses from a worker inside the message's pickle.

    A tensor in a DataLoader message travels as a shared-memory file descriptor, fetched from
    the worker over a socket: about 0.4-0.5 ms of the training thread's CPU per message on the
    CPU machine (``bench/bench_message.py``), for the 16 camera indices of a batch. DataLoader
    turns numpy arrays into tensors on the way, so the array is wrapped.
    """

    def __init__(self, array: np.ndarray):
        self.array = array


class _RingWriter(torch.utils.data.IterableDataset):
    """Runs in each worker: batches of the worker's samples, array fields written into its slots."""

    def __init__(self, stream: ShardStream, batch_size: int, slots: int):
        super().__init__()
        self.stream = stream
        self.batch_size = batch_size
        self.slots = slots

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rings: dict[str, torch.Tensor] | None = None
        count = 0
        samples: list[dict] = []
        for raw in self.stream.raw_samples():
            slot = count % self.slots
            if rings is None:
                sample = self.stream.decode(raw)  # the first sample sizes the rings
                rings = {
                    name: torch.empty(
                        (self.slots, self.batch_size, *value.shape), dtype=torch.from_numpy(value[:0]).dtype
                    ).share_memory_()
                    for name, value in sample.items()
                    if isinstance(value, np.ndarray)
                }
            else:
                # Images decode straight into this batch's slot (decode_stored writes into `out`).
                targets = {
                    name: rings[name][slot, len(samples)].numpy() for name in IMAGE_FIELDS if name in rings
                }
                sample = self.stream.decode(raw, out=targets if self.stream.device_finish else None)
            samples.append(sample)
            if len(samples) < self.batch_size:
                continue
            in_ring = {
                name
                for name, ring in rings.items()
                if all(item[name].shape == ring.shape[2:] for item in samples)
            }
            for name in in_ring:
                for index, item in enumerate(samples):
                    target = rings[name][slot, index]
                    if not np.shares_memory(item[name], target.numpy()):
                        target.copy_(torch.from_numpy(np.ascontiguousarray(item[name])))
            # Everything else (strings, numbers, an array whose shape differs) goes the usual way.
            rest = torch.utils.data.default_collate(
                [{name: value for name, value in item.items() if name not in in_ring} for item in samples]
            )
            rest = {
                name: InlineArray(value.numpy()) if torch.is_tensor(value) else value
                for name, value in rest.items()
            }
            message: dict[str, Any] = {
                "worker": worker,
                "slot": slot,
                "fields": sorted(in_ring),
                "rest": rest,
            }
            if count == 0:
                message["rings"] = rings  # mapped once by the consumer
            yield message
            count += 1
            samples = []


class RingBatches:
    """Endless batches of ``stream`` decoded by ``workers`` processes, array fields on ``device``.

    Args:
        stream: the rank's sample stream.
        batch_size: samples per batch.
        workers: DataLoader worker processes, at least 1.
        device: where array fields are delivered (CUDA: page-locked ring, non-blocking copies;
            CPU: copied out of the ring).
        prefetch: batches each worker may have ready (DataLoader's ``prefetch_factor``).
        finish: applied to each batch on the device after its copy (``--gpu_normalise``'s
            ``trainer.gpu_decode.finish_on_device``). On CUDA it runs on the copy stream one
            batch ahead: a batch's copy and finish are queued when the batch before it is
            handed out, so they overlap that batch's training step instead of preceding the next.
    """

    def __init__(
        self,
        stream: ShardStream,
        batch_size: int,
        workers: int,
        device: torch.device,
        prefetch: int = 2,
        finish: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ):
        if workers < 1:
            raise ValueError(f"workers {workers}: the ring needs worker processes (1 or more)")
        self.device = device
        self.workers = workers
        self._finish = finish
        self._cuda = device.type == "cuda"
        self._loader = torch.utils.data.DataLoader(
            _RingWriter(stream, batch_size, slots=prefetch + 2),
            batch_size=None,
            num_workers=workers,
            prefetch_factor=prefetch,
            pin_memory=False,
        )
        # Copies run on their own stream so that they overlap the training step's kernels (on
        # the step's stream they would wait for them: about 4-5 ms per batch of 16 on an H200).
        self._copy_stream = torch.cuda.Stream(device) if self._cuda else None
        self._rings: dict[int, dict[str, torch.Tensor]] = {}
        self._registered: list[torch.Tensor] = []
        self._iterator: Iterator | None = None

    def _map(self, worker: int, rings: dict[str, torch.Tensor]) -> None:
        if self._cuda:
            cudart = torch.cuda.cudart()
            for ring in rings.values():
                status = cudart.cudaHostRegister(ring.data_ptr(), ring.numel() * ring.element_size(), 0)
                if int(status) != 0:
                    raise RuntimeError(
                        f"cudaHostRegister of a {ring.numel() * ring.element_size() >> 20} MiB batch ring failed "
                        f"({status}); use --loader processes"
                    )
                self._registered.append(ring)
        self._rings[worker] = rings

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._iterator = iter(self._loader)
        copies: collections.deque = collections.deque()
        ahead: tuple[dict[str, Any], torch.cuda.Event] | None = None
        while True:
            batch, sources = self._receive(copies)
            if not self._cuda:
                batch.update({name: source.clone() for name, source in sources.items()})
                yield self._finish(batch) if self._finish is not None else batch
                continue
            # The small collated tensors too (camera indices): from pageable memory a copy
            # would first wait for every kernel queued on the training stream.
            sources.update(
                {name: value.pin_memory() for name, value in batch.items() if torch.is_tensor(value)}
            )
            queued = self._queue(batch, sources, copies)
            if ahead is not None:
                yield self._hand_over(*ahead)
            ahead = queued

    def _receive(self, copies: collections.deque) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The next message's small fields and its slot's tensors (still in the ring)."""
        # The next message lets a worker overwrite the slot of a batch received `workers`
        # receipts ago (module docstring): its copies must be finished.
        while len(copies) > self.workers:
            copies.popleft().synchronize()
        assert self._iterator is not None
        message = next(self._iterator)
        if "rings" in message:
            self._map(message["worker"], message["rings"])
        rings = self._rings[message["worker"]]
        rest = {
            name: torch.from_numpy(value.array) if isinstance(value, InlineArray) else value
            for name, value in message["rest"].items()
        }
        return rest, {name: rings[name][message["slot"]] for name in message["fields"]}

    def _queue(
        self, batch: dict[str, Any], sources: dict[str, torch.Tensor], copies: collections.deque
    ) -> tuple[dict[str, Any], torch.cuda.Event]:
        """Copy a slot to the device and finish it, both on the copy stream; returns the batch
        and the event its consumer must wait for."""
        assert self._copy_stream is not None
        with torch.cuda.stream(self._copy_stream):
            batch.update(
                {name: source.to(self.device, non_blocking=True) for name, source in sources.items()}
            )
            copied = torch.cuda.Event()
            copied.record(self._copy_stream)
            if self._finish is not None:
                batch = self._finish(batch)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        copies.append(copied)
        return batch, ready

    def _hand_over(self, batch: dict[str, Any], ready: torch.cuda.Event) -> dict[str, Any]:
        """The batch for the consumer's stream: it waits for the batch's copy and finish there."""
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(ready)
        for value in batch.values():
            if torch.is_tensor(value) and value.device.type == "cuda":
                value.record_stream(consumer)  # freed memory is reused only after the consumer's use
        return batch

    def close(self) -> None:
        """Stop the workers and unpin their buffers."""
        if self._cuda and self._registered:
            torch.cuda.synchronize(self.device)
            cudart = torch.cuda.cudart()
            for ring in self._registered:
                cudart.cudaHostUnregister(ring.data_ptr())
        self._registered.clear()
        self._rings.clear()
        self._iterator = None
