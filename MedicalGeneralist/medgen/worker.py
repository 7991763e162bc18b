"""The engine as a long-lived child process speaking JSON lines: how the Slicer module runs the model.

Why a process, not a thread: inside Slicer the main thread holds Python's GIL while Qt idles, so
a worker thread advances only while main-thread Python runs (a 9-slice run took minutes instead
of seconds under a 100 ms poll), and a CUDA out-of-memory or a crash in a native library would
take Slicer down with it. A child process runs at full speed, is killed at once on Cancel (the
scene was never touched: results come back as files), and its death is one message.

Protocol: one JSON object per line. stdout carries the protocol only (prints of libraries are
sent to stderr, which the module keeps as the log).
  in   {"cmd": "run", "id": 3, "folder": "/tmp/medgen-job-x"}  (a job written by medgen.io.jobs)
  in   {"cmd": "quit"}, or the end of stdin (the module, or Slicer, went away)
  out  {"event": "hello", "pid": 123, "protocol": 1}      the process is up; heavy imports follow
  out  {"event": "ready", "torch": "2.13.0", "cuda": false, "mps": false, "seconds": 4.2}
  out  {"event": "progress", "id": 3, "fraction": 0.4, "message": "..."}
  out  {"event": "done", "id": 3, "outputs": ["output_0.nrrd"], "seconds": 2.5, "model_seconds": 0.3}
  out  {"event": "error", "id": 3, "kind": "input|memory|internal|setup", "message": "...", "details": "..."}
  out  {"event": "bye", "reason": "idle"}                  before an idle exit
Kept warm: imports and each model are loaded once and reused by later runs; after every run the
CUDA cache is emptied, and `--idle-exit` seconds without a command end the process (and with it
the CUDA context).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import queue
import sys
import threading
import time
import traceback
from pathlib import Path

PROTOCOL = 1
PROGRESS_INTERVAL_S = 0.1


class Channel:
    """The protocol stream: the real stdout, taken away from everything else in the process."""

    def __init__(self) -> None:
        sys.stdout.flush()
        fd = os.dup(1)
        os.dup2(2, 1)  # C libraries and print() now write to stderr
        sys.stdout = sys.stderr
        self._out = os.fdopen(fd, "w", encoding="utf-8", buffering=1)
        self._lock = threading.Lock()

    def send(self, **event) -> None:
        line = json.dumps(event, default=str)
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()


def _commands(stream) -> queue.Queue:
    """Lines of stdin on a queue (None at the end), so that the main loop can wait with a timeout."""
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for raw in stream:
            lines.put(raw)
        lines.put(None)

    threading.Thread(target=read, name="medgen-stdin", daemon=True).start()
    return lines


class Engine:
    """Imports and models, loaded once per process."""

    def __init__(self) -> None:
        import torch

        from medgen.infer import pipeline  # noqa: F401  (the heavy imports, done before 'ready')
        from medgen.io import jobs, weights  # noqa: F401

        self.torch = torch
        self.models: dict[str, object] = {}

    def info(self) -> dict:
        mps = getattr(self.torch.backends, "mps", None)
        return {"torch": self.torch.__version__, "cuda": bool(self.torch.cuda.is_available()),
                "mps": bool(mps is not None and mps.is_available())}

    @staticmethod
    def warm_up() -> None:
        """Load the fill-between-slices backend in the background while no run asks for it yet
        (ITK's wrappers take seconds to import; Python's import lock makes a run that needs it
        meanwhile wait for this import instead of doing it twice)."""
        try:
            from medgen.infer import interpolate

            available = getattr(interpolate, "available", None)
            if available is not None:
                available()
        except Exception:  # a broken backend is reported by the run that needs it
            pass

    def model(self, spec: str | None):
        from medgen.io.weights import load_model

        key = spec or "default"
        if key not in self.models:
            self.models[key] = load_model(spec, device="cpu")[0]
        return self.models[key]

    def run(self, message: dict, channel: Channel) -> None:
        from medgen.core.errors import MedGenError

        job_id = message.get("id")
        start = time.perf_counter()
        progress = _Progress(channel, job_id)
        try:
            outputs, model_seconds, report = self._run(Path(message["folder"]), progress)
            channel.send(event="done", id=job_id, outputs=outputs, seconds=round(time.perf_counter() - start, 3),
                         model_seconds=model_seconds, report=report)
        except MedGenError as error:
            channel.send(event="error", id=job_id, kind="input", message=str(error), details="")
        except BaseException as error:  # reported, never fatal: the process stays warm
            kind, text = self._describe(error)
            channel.send(event="error", id=job_id, kind=kind, message=text, details=traceback.format_exc())
            if isinstance(error, KeyboardInterrupt):
                raise
        finally:
            self.release()

    def _run(self, folder: Path, progress) -> tuple[list[str], float, list[list[str]]]:
        """(output file names, seconds to get the model, the self-check's lines of each group)."""
        from medgen.infer.pipeline import RunOptions, run_with_report
        from medgen.infer.segment import SegmentSettings
        from medgen.io import jobs

        job = jobs.read_job(folder)
        progress(0.0, "loading the model", force=True)
        t0 = time.perf_counter()
        model = self.model(job.model)
        model_seconds = round(time.perf_counter() - t0, 3)
        o = job.options
        options = RunOptions(o.task, o.axis, o.modality, o.device, o.threads, o.seed, o.adapt_steps,
                             segment=SegmentSettings(mode=o.mode))
        outputs, lines = [], []
        for g, examples in enumerate(job.groups):
            report = lambda f, m, g=g: progress((g + f) / len(job.groups), m)
            result = run_with_report(model, job.image, examples, options, mask=job.mask, progress=report)
            if result is None:  # only a cancel callback returns None, and there is none here
                raise RuntimeError("the engine stopped without a result")
            outputs.append(jobs.write_output(folder, g, job.image, result.volume.array).name)
            lines.append(result.report.lines())
        return outputs, model_seconds, lines

    def _describe(self, error: BaseException) -> tuple[str, str]:
        oom = tuple(t for t in (getattr(self.torch, "OutOfMemoryError", None),
                                getattr(self.torch.cuda, "OutOfMemoryError", None)) if t is not None)
        if isinstance(error, MemoryError) or (oom and isinstance(error, oom)) or "out of memory" in str(error):
            return "memory", ("the model ran out of memory: run fewer slices (between or around the examples), "
                              "fewer segments at once, or choose the CPU device")
        return "internal", f"the model failed: {type(error).__name__}: {error}"

    def release(self) -> None:
        """Give cached GPU memory back after each run (the model itself stays loaded)."""
        gc.collect()
        if self.torch.cuda.is_available() and self.torch.cuda.is_initialized():
            self.torch.cuda.empty_cache()


class _Progress:
    """Progress lines at most every PROGRESS_INTERVAL_S (the engine reports per slice batch)."""

    def __init__(self, channel: Channel, job_id) -> None:
        self.channel, self.job_id, self.last = channel, job_id, 0.0

    def __call__(self, fraction: float, message: str, force: bool = False) -> None:
        now = time.perf_counter()
        if force or fraction >= 1.0 or now - self.last >= PROGRESS_INTERVAL_S:
            self.last = now
            self.channel.send(event="progress", id=self.job_id, fraction=round(float(fraction), 4),
                              message=str(message))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medgen.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--idle-exit", type=float, default=0.0,
                        help="exit after this many seconds without a command (0: never)")
    args = parser.parse_args(argv)
    channel = Channel()
    channel.send(event="hello", pid=os.getpid(), protocol=PROTOCOL)
    start = time.perf_counter()
    try:
        engine = Engine()
    except ImportError as error:
        channel.send(event="error", id=None, kind="setup", details=traceback.format_exc(),
                     message=f"the model process cannot import {error.name or error}: install the module's "
                             "Python packages (Run offers to install them), then restart Slicer")
        return 3
    channel.send(event="ready", seconds=round(time.perf_counter() - start, 3), **engine.info())
    warm_up = threading.Thread(target=engine.warm_up, name="medgen-warm-up", daemon=True)
    warm_up.start()
    code = _serve(engine, channel, args.idle_exit)
    # Leave at once, without interpreter finalisation: the warm-up thread may be inside an
    # extension import (finalising then aborts the process), and there is nothing to clean up
    # (every output was written and closed before its 'done' line; the OS frees GPU memory).
    sys.stderr.flush()
    os._exit(code)


def _serve(engine: Engine, channel: Channel, idle_exit: float) -> int:
    """Answer commands until quit, the end of stdin, or `idle_exit` seconds without one."""
    commands = _commands(sys.stdin.buffer)
    while True:
        try:
            raw = commands.get(timeout=idle_exit or None)
        except queue.Empty:
            channel.send(event="bye", reason="idle")
            return 0
        if raw is None:
            return 0
        try:
            message = json.loads(raw)
        except ValueError:
            channel.send(event="error", id=None, kind="internal", message=f"not a command: {raw[:80]!r}", details="")
            continue
        if message.get("cmd") == "quit":
            return 0
        if message.get("cmd") == "run":
            engine.run(message, channel)
        else:
            channel.send(event="error", id=message.get("id"), kind="internal",
                         message=f"unknown command {message.get('cmd')!r}", details="")


if __name__ == "__main__":
    sys.exit(main())
