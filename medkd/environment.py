"""What a run ran on: recorded in every run's metrics, since CPU kernels (bf16 paths, AMX or not)
and library versions change the numbers between machines."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "torchvision", "timm", "transformers", "numpy", "scikit-learn", "optuna")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment(device: torch.device, bf16: bool) -> dict:
    """The machine, the ISA torch's CPU kernels use, GPU, threads, precision and library versions."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["torch"] = torch.__version__  # with its build (e.g. +cu130, +cpu): kernels differ between builds
    return {
        "cpu": cpu_model(),
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": str(device),
        "precision": "bf16 autocast" if bf16 else "fp32",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }
