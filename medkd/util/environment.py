"""What a run ran on: recorded in every run's metrics, since CPU kernels (bf16 paths, AMX or not)
and library versions change the numbers between machines; and whether this machine can run what
params.yaml asks (a GPU, bf16).

torch is imported by the functions that need it, not by this module: `medkd check-params` asks
`machine_problem` about the default settings (fp32, any device) without loading torch."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: this module imports torch where it is used
    import torch

PACKAGES = ("torch", "torchvision", "timm", "transformers", "numpy", "scikit-learn", "optuna")


def _cpuinfo(*keys: str) -> str | None:
    """The value of the first /proc/cpuinfo line that starts with one of `keys` (None: no such line)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(keys):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or "unknown CPU"


def cpu_runs_bf16_natively() -> bool:
    """Whether this CPU has bf16 matrix instructions: x86 AVX512-BF16 or AMX (torch's own probes), Arm's
    BF16 extension (`bf16` among /proc/cpuinfo's features). Without them torch emulates bf16 products:
    0.9 GFLOP/s against 103 in fp32 on a 2-core AVX2 EPYC (1024² `torch.mm`). Anything that cannot be
    told counts as emulated: fp32 is always right, bf16 on the wrong CPU looks like a hang."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        import torch

        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(probe() for probe in probes if probe is not None)
    if machine in ("aarch64", "arm64"):
        return "bf16" in cpu_features()
    return False


def cpu_features() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (x86 `flags`, Arm `Features`); empty if unknown."""
    return set((_cpuinfo("flags", "Features") or "").split())


def cpu_has_vnni() -> bool:
    """Whether this CPU has VNNI int8 dot products (x86 AVX512-VNNI or AVX-VNNI): ONNX Runtime's int8
    kernels take another path without them (recorded with every int8 export)."""
    return bool({"avx512_vnni", "avx_vnni"} & cpu_features())


def bf16_is_native(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware (a CUDA GPU that supports it, or see cpu_runs_bf16_natively)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.is_bf16_supported(including_emulation=False)
    return cpu_runs_bf16_natively()


def environment(device: torch.device, bf16: bool, requested: str | None = None) -> dict:
    """The machine, the ISA torch's CPU kernels use, GPU, threads, precision and library versions."""
    import torch

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
        "precision": "bf16 autocast" if bf16 else "fp32",  # what ran
        "precision_requested": requested,  # runtime.precision: fp32 | bf16 | auto
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def resolve_device(spec: str = "auto") -> torch.device:
    """The device `runtime.device` names; `cuda` (or `auto` with a GPU) under torchrun: this rank's GPU."""
    import torch

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if spec in ("cuda", "auto") and torch.cuda.is_available() and distributed:
        spec = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} requested but CUDA is not available")
    return device


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a run with `precision` (fp32 | bf16 | auto) computes in bf16 autocast on `device`."""
    return precision == "bf16" or (precision == "auto" and bf16_is_native(device))


def precision_problem(device: torch.device, precision: str) -> str | None:
    """Why `precision` cannot run on `device`, or None: bf16 on hardware without bf16 instructions is
    emulated, about 100x slower than fp32 on a CPU (a teacher step of 230 s instead of 2), a run that
    looks hung. `medkd check-params` (the pipeline's first stage) and every training run refuse it."""
    if precision != "bf16" or bf16_is_native(device):
        return None
    import torch

    where = (f"this CPU ({cpu_model()}, {torch.backends.cpu.get_cpu_capability()}) has no bf16 instructions "
             "(AVX512-BF16 or AMX; on Arm the bf16 extension): it would be emulated, about 100x slower than fp32"
             if device.type == "cpu" else f"GPU {torch.cuda.get_device_name(device)} has no native bf16")
    return (f"runtime.precision is bf16, but {where}. Set runtime.precision: fp32 (the default) or auto "
            "(bf16 where the hardware has it, fp32 elsewhere).")


def machine_problem(device: str, precision: str) -> str | None:
    """Why this machine cannot run `runtime.device` / `runtime.precision`, or None. The defaults (fp32 on
    the CPU or whatever `auto` finds) always run and are answered without importing torch."""
    if precision == "fp32" and device in ("auto", "cpu"):
        return None
    try:
        return precision_problem(resolve_device(device), precision)
    except RuntimeError as err:
        return f"runtime.device: {err}"
