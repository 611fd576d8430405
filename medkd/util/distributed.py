"""Data-parallel training across processes (`torchrun`): who this process is and the few collectives
the engine needs. A leaf module; every helper is the identity in a single process.

The engine shards each *global* batch (what a one-process run would take) over the ranks, so a
run on N processes sees the same batches, the same CRD negatives and the same memory updates as
one process with the same seed; gradients are averaged over the ranks with one all-reduce.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the process that evaluates and writes outputs."""
    return rank() == 0


def init_from_env(device_type: str = "cpu") -> bool:
    """Join the process group `torchrun` describes (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPUs.

    Returns whether this process is one of several.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return True


def shard(batch: Sequence[int]) -> list[int]:
    """This rank's contiguous part of a global batch (ranks in order rebuild the batch)."""
    parts = torch.tensor_split(torch.as_tensor(list(batch), dtype=torch.long), world_size())
    return parts[rank()].tolist()


def gather_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's rows, concatenated in rank order, and the offset of this rank's rows.

    Ranks may hold different numbers of rows (the last batch of an epoch).
    """
    if not is_distributed():
        return tensor, 0
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([len(tensor)], device=tensor.device))
    sizes = [int(s) for s in sizes]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded.contiguous())
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)]), sum(sizes[: rank()])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over the ranks: one all-reduce of all of them, flattened.

    Parameters without a gradient (unused by the model, the same on every rank) keep none, so
    the optimizer skips them as it does in one process.
    """
    if not is_distributed():
        return
    params = [p for p in params if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1).float() for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for p in params:
        # copy_ into the gradient itself: it keeps the parameter's memory layout (channels-last
        # convolutions), which fused optimizers read element by element.
        p.grad.copy_(flat[offset: offset + p.numel()].view(p.grad.shape))
        offset += p.numel()


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (same start, whatever each rank loaded)."""
    if is_distributed():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def average_float_buffers(module: torch.nn.Module) -> None:
    """Mean over the ranks of floating-point buffers (BatchNorm running statistics, which each rank
    updates from its own part of the batch)."""
    if is_distributed():
        for buffer in module.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer.data, op=dist.ReduceOp.SUM)
                buffer.data /= world_size()


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()
