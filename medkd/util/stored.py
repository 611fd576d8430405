"""Reading the study's own stored files (trunk and teacher caches, resume state, checkpoints), where a
damaged file is no reason to stop: a copy cut short, a full disk, a crash while writing elsewhere.

`load_or_none` returns None for a file that is missing or cannot be read; for the second it says so in
one line naming the file (in the notebook, and in the terminal through `medkd.util.progress`), and the
caller computes the file again, as if it had never been there.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from medkd.util import progress


class UnreadableFile(RuntimeError):
    """A stored file that cannot be read; the message names it and what to do."""


def load(path: Path, weights_only: bool = True) -> Any:
    """`torch.load` of a stored file; an unreadable one is an UnreadableFile naming it and the cause."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except FileNotFoundError:
        raise
    except Exception as err:  # a truncated zip, a half-written pickle, garbage: torch raises many kinds
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnreadableFile(f"{path} cannot be read ({type(err).__name__}: {cause[:160]})") from None


def load_or_none(path: Path, what: str, weights_only: bool = True) -> Any | None:
    """The stored file at `path`, or None when it is missing or damaged (`what` it is, for the message)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return load(path, weights_only)
    except UnreadableFile as err:
        warn(f"{what} {err}; treated as missing: computed again")
        return None


def warn(message: str) -> None:
    """One line for the person running the study: in the notebook (stderr) and in the terminal."""
    print(message, file=sys.stderr, flush=True)
    progress.note(message)
