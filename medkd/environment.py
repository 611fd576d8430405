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


def cpu_runs_bf16_natively() -> bool:
    """Whether this CPU has bf16 matrix instructions (x86: AVX512-BF16 or AMX). Without them torch
    emulates bf16 products: 0.9 GFLOP/s against 103 in fp32 on a 2-core AVX2 EPYC (1024² `torch.mm`).
    Other architectures are not judged here (True)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not any(probes):  # a torch without these probes: no way to tell, so no objection
        return True
    return any(probe() for probe in probes if probe is not None)


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
