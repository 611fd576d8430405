"""Progress a person can watch: what a stage is doing, its latest dev score, and how much is done.

The stages and the engine say what they do (`span` for a part of the work, `update` inside it); where
the stage runner asked for it (the environment variable `MEDKD_PROGRESS` names a file), each update is
appended there as one JSON line, which the runner turns into terminal lines with the elapsed time and
an estimate of what is left (`medkd.pipeline.runner`). Anywhere else (library calls, tests, a notebook
run by hand) updates go nowhere. The rendered notebook never sees them.

Spans nest: `span("run 3/10", 2/10, 3/10)` says that run 3 covers the stage's fraction 0.2 to 0.3, and
`update("epoch 2/6", fraction=0.5)` inside it puts the stage at 0.25.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from typing import Iterator

ENV = "MEDKD_PROGRESS"
MIN_INTERVAL = 2.0  # seconds between two routine updates written (an epoch's end is always written)


@dataclass
class _Span:
    label: str
    start: float  # the span's share of its parent: [start, end)
    end: float
    done: float = 0.0  # how much of this span is done, 0..1


_spans: list[_Span] = [_Span("", 0.0, 1.0)]  # the stage itself, then the open spans
_last_written = 0.0


def fraction_done() -> float:
    """The stage's fraction done, from the open spans (outermost first)."""
    fraction, scale = 0.0, 1.0
    for span in _spans:
        fraction += scale * span.start
        scale *= span.end - span.start
    return fraction + scale * _spans[-1].done


@contextlib.contextmanager
def span(label: str, start: float = 0.0, end: float = 1.0) -> Iterator[None]:
    """A part of the work covering [start, end) of the enclosing span (or of the stage)."""
    _spans.append(_Span(label, start, end))
    update(force=True)
    try:
        yield
    finally:
        _spans.pop()


def update(doing: str = "", fraction: float | None = None, dev: float | None = None, force: bool = False) -> None:
    """`doing` inside the innermost span, `fraction` of that span done; `dev`: the latest dev score."""
    global _last_written
    if fraction is not None:
        _spans[-1].done = min(max(fraction, 0.0), 1.0)
    path = os.environ.get(ENV)
    now = time.time()
    if not path or (not force and dev is None and now - _last_written < MIN_INTERVAL):
        return
    _last_written = now
    what = " · ".join([*(s.label for s in _spans if s.label), *([doing] if doing else [])])
    _write(path, {"time": now, "doing": what, "fraction": round(fraction_done(), 5), "dev": dev})


def note(message: str) -> None:
    """Something the person running the stage should read at once (a damaged cache file, say)."""
    path = os.environ.get(ENV)
    if path:
        _write(path, {"time": time.time(), "note": message})


def _write(path: str, event: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(event) + "\n")
