"""How fast can batches of decoded screen-loss samples move from DataLoader workers to the GPU?

No decoding: each worker makes fresh arrays of the decoded sizes (a 2048 x 1334 photo and two
1024 textures, uint8), as a decoder does, and the training process moves batches of 16 to the
GPU. Three paths, each in its own process:

* ``pin``: ``DataLoader(pin_memory=True)`` (the plain trainer path);
* ``nopin``: ``DataLoader(pin_memory=False)``, copies from shared memory;
* ``ring``: workers write into their slots of a shared buffer page-locked once by the training
  process (the idea behind ``trainer.feeder.RingBatches``, here without its safety waits).

Run on a GPU machine: ``python3 bench/bench_transfer.py`` (prints samples/s and the training
process's CPU use per path and worker count; results in BENCHMARKS.md).
"""

import os
import subprocess
import sys
import time

import numpy as np
import torch

BATCH = 16
SHAPES = {"photo": (2048, 1334, 3), "tex": (1024, 1024, 3), "avg_tex": (1024, 1024, 3)}
SLOTS_PER_WORKER = 4
MODES = ("pin", "nopin", "ring")


class FreshArrays(torch.utils.data.IterableDataset):
    """Samples in fresh memory, as a decoder returns them."""

    def __iter__(self):
        template = {name: np.full(shape, 7, np.uint8) for name, shape in SHAPES.items()}
        while True:
            yield {name: value.copy() for name, value in template.items()}


class RingWriter(torch.utils.data.IterableDataset):
    """Whole batches written into the worker's slots of shared buffers; yields the slot."""

    def __init__(self, rings: dict[str, torch.Tensor]):
        self.rings = rings

    def __iter__(self):
        worker = torch.utils.data.get_worker_info().id
        template = {name: np.full(shape, 7, np.uint8) for name, shape in SHAPES.items()}
        count = 0
        while True:
            slot = worker * SLOTS_PER_WORKER + count % SLOTS_PER_WORKER
            for index in range(BATCH):
                for name, value in template.items():
                    self.rings[name][slot, index].copy_(torch.from_numpy(value.copy()))
            yield slot
            count += 1


def measure(mode: str, workers: int, batches: int = 40) -> str:
    device = torch.device("cuda")
    rings: dict[str, torch.Tensor] = {}
    if mode == "ring":
        slots = workers * SLOTS_PER_WORKER
        cudart = torch.cuda.cudart()
        for name, shape in SHAPES.items():
            ring = torch.zeros((slots, BATCH, *shape), dtype=torch.uint8).share_memory_()
            assert int(cudart.cudaHostRegister(ring.data_ptr(), ring.numel(), 0)) == 0
            rings[name] = ring
        loader = torch.utils.data.DataLoader(RingWriter(rings), batch_size=None, num_workers=workers)
    else:
        loader = torch.utils.data.DataLoader(
            FreshArrays(), batch_size=BATCH, num_workers=workers, pin_memory=mode == "pin"
        )
    iterator = iter(loader)
    for _ in range(2 * workers):
        next(iterator)
    torch.cuda.synchronize()
    began, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        item = next(iterator)
        sources = {name: ring[item] for name, ring in rings.items()} if mode == "ring" else item
        for value in sources.values():
            value.to(device, non_blocking=True)
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - began
    return (
        f"| {mode} | {workers} | {batches * BATCH / elapsed:.0f} | "
        f"{100 * (time.process_time() - cpu) / elapsed:.0f}% |"
    )


def main() -> None:
    if len(sys.argv) == 3:
        print(measure(sys.argv[1], int(sys.argv[2])), flush=True)
        os._exit(0)  # skip the DataLoader's teardown: each measurement is its own process
    print("| path | workers | samples/s | training process CPU |\n|---|---|---|---|", flush=True)
    for workers in (8, 14):
        for mode in MODES:
            command = [sys.executable, __file__, mode, str(workers)]
            subprocess.run(command, stderr=subprocess.DEVNULL, timeout=300, check=False)


if __name__ == "__main__":
    main()
