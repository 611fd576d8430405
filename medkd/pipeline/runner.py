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
- the runner dies with its parent (`dvc`) and the kernel with the runner: no orphans.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import papermill
import yaml
from jupyter_client.manager import AsyncKernelManager
from papermill.exceptions import PapermillExecutionError

from medkd.pipeline.lifecycle import die_with_parent

EXIT_FAILED, EXIT_INTERRUPTED = 1, 130


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
    os.environ.setdefault("TQDM_MININTERVAL", "20")  # rendered notebooks get a readable bar
    logging.getLogger("papermill").setLevel(logging.ERROR)
    started = time.perf_counter()
    with tempfile.NamedTemporaryFile(prefix="medkd-kernel-", suffix=".log", delete=False) as log:
        log_path = log.name
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
        for s, handler in previous.items():
            signal.signal(s, handler)
        Path(log_path).unlink(missing_ok=True)
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
