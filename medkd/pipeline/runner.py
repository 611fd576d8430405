"""`medkd run-stage`: run one stage notebook with papermill, as DVC's stage command
(`python -m medkd.pipeline.runner NOTEBOOK OUTPUT [-p NAME VALUE]...`, which imports no torch: the
kernel does that once, not the runner too).

What it adds to a bare `papermill` call:
- a failed stage ends with one line naming the cause (`stage failed: ParamsError: …`), above
  it the error's full text; the traceback stays in the rendered notebook;
- a successful stage prints no error-looking lines (the kernel's own log goes to a temporary
  file, shown only if the kernel dies);
- SIGINT/SIGTERM interrupt the running cell (training stops at once with "interrupted at epoch
  N, re-run to resume") instead of killing the kernel mid-write; a second signal kills it;
- the runner dies with its parent (`dvc`) and the kernel with the runner: no orphans;
- the terminal shows what the stage is doing while it runs (`medkd.util.progress`): a line for each new
  step (at most every PRINT_EVERY seconds, at once for a new dev score) with the time elapsed, the
  latest dev score and an estimate of what is left, and the last step again after HEARTBEAT seconds of
  nothing new; the rendered notebook keeps a few readable lines instead of progress bars.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import papermill
import yaml
from jupyter_client.manager import AsyncKernelManager
from papermill.exceptions import PapermillExecutionError

from medkd.pipeline.lifecycle import die_with_parent
from medkd.util import progress

EXIT_FAILED, EXIT_INTERRUPTED = 1, 130
PRINT_EVERY = float(os.environ.get("MEDKD_PRINT_EVERY", 10.0))  # seconds between two lines of new steps
HEARTBEAT = 30.0  # seconds without anything new after which the last step is said again
# The kernel's environment: progress to the terminal (not as bars into the notebook); tqdm's notice that
# ipywidgets are missing says nothing about the study.
KERNEL_ENV = {"TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore:IProgress not found"}


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60:02d}:{seconds % 60:02d}"


class Watch(threading.Thread):
    """Reads a stage's progress events (JSON lines) and prints them to the terminal as it runs."""

    def __init__(self, path: Path, name: str, out, started: float):
        super().__init__(daemon=True)
        self.path, self.name, self.out, self.started = Path(path), name, out, started
        self.offset, self.event, self.dev = 0, None, None
        self.printed_at, self.printed = started, None
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            self.tick(time.time())

    def stop(self) -> None:
        """Stop watching; what came since the last look is still said: its notes, and a new dev score."""
        self.stopped.set()
        self.join(timeout=5)
        fresh_dev, notes = self.read()
        now = time.time()
        for text in notes:
            print(f"  {self.name} {clock(now - self.started)} · {text}", file=self.out, flush=True)
        if fresh_dev and self.event is not self.printed:
            print(self.line(now), file=self.out, flush=True)

    def tick(self, now: float) -> None:
        fresh_dev, notes = self.read()
        for text in notes:
            print(f"  {self.name} {clock(now - self.started)} · {text}", file=self.out, flush=True)
        new = self.event is not None and self.event is not self.printed
        if (new and (fresh_dev or now - self.printed_at >= PRINT_EVERY)) or now - self.printed_at >= HEARTBEAT:
            print(self.line(now), file=self.out, flush=True)
            self.printed_at, self.printed = now, self.event

    def read(self) -> tuple[bool, list[str]]:
        """Take the events written since the last read: whether one brought a new dev score, and the notes."""
        if not self.path.exists():
            return False, []
        with open(self.path, encoding="utf-8") as f:
            f.seek(self.offset)
            lines = f.readlines()
        fresh, notes = False, []
        for line in lines:
            if not line.endswith("\n"):  # half-written: read it whole next time
                break
            self.offset += len(line.encode())
            event = json.loads(line)
            if "note" in event:
                notes.append(event["note"])
                continue
            self.event = event
            if event.get("dev") is not None:
                self.dev, fresh = event["dev"], True
        return fresh, notes

    def line(self, now: float) -> str:
        elapsed = now - self.started
        parts = [f"  {self.name} {clock(elapsed)}"]
        if self.event is None:
            parts.append("starting the notebook's kernel")
        else:
            parts.append(self.event["doing"] or "working")
        if self.dev is not None:
            parts.append(f"dev avg F1 {self.dev:.3f}")
        fraction = self.event["fraction"] if self.event else 0.0
        if fraction >= 0.02:
            parts.append(f"{fraction:.0%}, ~{clock(elapsed * (1 - fraction) / fraction)} left")
        return " · ".join(parts)


class _QuietKernelManager(AsyncKernelManager):
    """Starts the kernel with its stdout/stderr in a log file instead of the terminal."""

    log_path: str = os.devnull

    async def start_kernel(self, **kwargs):  # type: ignore[override]
        log = open(self.log_path, "ab")  # noqa: SIM115 - the kernel process owns it from here
        kwargs.setdefault("stdout", log)
        kwargs.setdefault("stderr", log)
        try:
            return await self._async_start_kernel(**kwargs)
        finally:
            log.close()

    @property
    def kernel_pid(self) -> int | None:
        return getattr(self.provisioner, "pid", None) if self.provisioner is not None else None


def run_stage(notebook: Path, output: Path, parameters: dict, cwd: Path | None = None, out=sys.stderr) -> int:
    """Execute `notebook` into `output` with `parameters`; return the process exit code."""
    die_with_parent()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("papermill").setLevel(logging.ERROR)
    started = time.perf_counter()
    with tempfile.NamedTemporaryFile(prefix="medkd-kernel-", suffix=".log", delete=False) as log:
        log_path = log.name
    events = Path(log_path).with_suffix(".progress")
    os.environ.update({**KERNEL_ENV, progress.ENV: str(events)})  # the kernel inherits this process's environment
    watch = Watch(events, output.stem, out, time.time())
    watch.start()
    # IPC (Unix sockets in a private folder) rather than TCP on localhost: nothing else can connect
    # to the kernel, and ipykernel has no reason to warn about unencrypted traffic.
    sockets = tempfile.mkdtemp(prefix="medkd-kernel-")
    km = _QuietKernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(sockets, "kernel"))
    km.log_path = log_path
    signals = []

    def on_signal(signum, frame):
        signals.append(signum)
        pid = km.kernel_pid
        if len(signals) == 1 and pid:
            print(f"{signal.Signals(signum).name}: stopping the stage (a second signal kills it)", file=out, flush=True)
            os.kill(pid, signal.SIGINT)  # the running cell raises KeyboardInterrupt and stops cleanly
            return
        if pid:
            os.kill(pid, signal.SIGKILL)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        papermill.execute_notebook(str(notebook), str(output), parameters=parameters, cwd=str(cwd or Path.cwd()),
                                   kernel_name="python3", progress_bar=False, km=km)
    except PapermillExecutionError as err:
        return _report_failure(err.ename, err.evalue, output, out, interrupted=bool(signals))
    except KeyboardInterrupt:
        print(f"stage interrupted: killed {output.name} before its current cell finished; re-run to resume "
              "from the last complete epoch", file=out, flush=True)
        return EXIT_INTERRUPTED
    except Exception as err:  # the kernel died or could not start: its log says why
        tail = Path(log_path).read_text(errors="replace").strip().splitlines()[-15:]
        for line in tail:
            print(f"  kernel: {line}", file=out)
        print(f"stage failed: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}",
              file=out, flush=True)
        return EXIT_FAILED
    finally:
        watch.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        Path(log_path).unlink(missing_ok=True)
        events.unlink(missing_ok=True)
        shutil.rmtree(sockets, ignore_errors=True)
    print(f"stage done: {output} ({time.perf_counter() - started:.0f} s)", file=out, flush=True)
    return 0


def _report_failure(ename: str, evalue: str, output: Path, out, interrupted: bool) -> int:
    lines = str(evalue).strip().splitlines() or [""]
    for line in lines[1:]:
        print(line, file=out)
    if interrupted or ename in ("TrainingInterrupted", "KeyboardInterrupt"):
        print(f"stage interrupted: {lines[0] or ename} (notebook: {output})", file=out, flush=True)
        return EXIT_INTERRUPTED
    print(f"stage failed: {ename}: {lines[0]} (traceback in {output})", file=out, flush=True)
    return EXIT_FAILED


def parameter_value(text: str):
    """papermill's -p: YAML scalars (numbers, booleans) become values, anything else stays a string."""
    value = yaml.safe_load(text)
    return value if isinstance(value, (int, float, bool)) else text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medkd run-stage",
                                     description="run a stage notebook with papermill (DVC's stage command)")
    parser.add_argument("notebook", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_stage(args.notebook, args.output, {name: parameter_value(value) for name, value in args.parameter})


if __name__ == "__main__":
    sys.exit(main())
