"""The machine a benchmark ran on, recorded beside its numbers: every script in benchmarks/ describes it this way.

    info = machine("cpu")   # a dict, for the JSON results
    print(describe(info))   # one line, for the printed tables
"""
import os
import platform

import torch


def machine(device="cpu"):
    """CPU model, cores, torch threads and versions, the GPU where `device` is CUDA, and the 1-minute load average
    before the run (a busy machine slows every number down)."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else None,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def describe(info):
    """`machine()`'s dict as one line."""
    load = "" if info["load_average"] is None else f", load average {info['load_average']:.1f}"
    return (f"{info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads), "
            f"GPU: {info['gpu'] or 'none'}, torch {info['torch']}, Python {info['python']}{load}")
