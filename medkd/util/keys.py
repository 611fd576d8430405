"""Content keys: sha256 fingerprints of what a cached or resumed result was computed from. A leaf module."""

from __future__ import annotations

import hashlib
import json
from typing import Mapping

import torch


def content_key(*parts) -> str:
    """sha256 of JSON-serialisable parts (anything else by its str)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def state_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, dtypes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
