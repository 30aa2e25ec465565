"""Shared by the bench scripts: the training's runtime on a device, and the median wall time of a
callable, synchronising CUDA."""
import statistics
import time

import torch

from dptq.runtime import Runtime


def bench_runtime(device: torch.device, channels_last: bool = True) -> Runtime:
    """The runtime the training starts on ``device`` (bf16 autocast on CUDA), keeping torch's
    thread count (``--threads``)."""
    return Runtime(0, device=str(device), bf16=True, channels_last=channels_last, threads=torch.get_num_threads())


def median_ms(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, caches
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)
