"""The module's side of the engine process (`medgen.worker`): start it, hand it jobs, follow them
without blocking, kill it.

No threads here. Inside Slicer the main thread holds Python's GIL while Qt idles, so a reader
thread would only run while main-thread Python runs; the worker's stdout is therefore read in
non-blocking mode from the main thread's timer (`WorkerJob.poll`), which never waits. The same
poll runs in scripts and tests (`WorkerJob.wait` sleeps between polls). Cancel kills the whole
process tree (in Slicer `PythonSlicer` is a launcher whose child runs Python), and the next run
starts a fresh process. No Qt and no MRML: the pytest suite drives it with `sys.executable`.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ENGINE_DIR = Path(__file__).resolve().parents[1]  # the folder holding the `medgen` package
# argv: -c BOOT <engine dir> <worker arguments>; the engine dir is put first on sys.path so that
# the worker runs the engine shipped with this module, whatever else the Python has installed.
BOOT = "import sys; sys.path.insert(0, sys.argv.pop(1)); from medgen.worker import main; sys.exit(main(sys.argv[1:]))"
IDLE_EXIT_S = 20 * 60.0  # an idle worker ends itself after this, freeing the GPU
KILL_WAIT_S = 1.0
LOG_TAIL_LINES = 25
WINDOWS_CRASHES = {0xC0000005: "access violation", 0xC00000FD: "stack overflow", 0xC0000409: "buffer overrun",
                   0xC0000017: "out of memory"}


class WorkerError(RuntimeError):
    """A run that failed in the worker or with it; `kind`: input, memory, internal, setup or crash."""

    def __init__(self, message: str, kind: str = "internal", details: str = "") -> None:
        super().__init__(message)
        self.kind, self.details = kind, details


class PipeReader:
    """Whatever bytes a pipe holds now, without waiting: os.set_blocking where the platform can
    (POSIX; Windows pipes from Python 3.12 on), PeekNamedPipe on older Windows Pythons."""

    def __init__(self, pipe) -> None:
        self._fd = pipe.fileno()
        self._peek = None
        if os.name == "nt" and sys.version_info < (3, 12):
            import _winapi
            import msvcrt

            handle = msvcrt.get_osfhandle(self._fd)
            self._peek = lambda: _winapi.PeekNamedPipe(handle, 0)[0]
        else:
            os.set_blocking(self._fd, False)

    def read(self) -> bytes | None:
        """Bytes available now (maybe b""), or None once the writer has closed the pipe."""
        chunks = []
        while True:
            try:
                if self._peek is not None:
                    size = self._peek()
                    if not size:
                        return b"".join(chunks)
                    data = os.read(self._fd, size)
                else:
                    data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                return b"".join(chunks)
            except (BrokenPipeError, OSError):
                data = b""
            if not data:
                return b"".join(chunks) if chunks else None
            chunks.append(data)


def kill_tree(pid: int) -> None:
    """Kill a process and all its descendants now (psutil where installed; else its process group)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            root = psutil.Process(pid)
            family = root.children(recursive=True) + [root]
        except psutil.NoSuchProcess:
            return
        for process in family:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        end = time.perf_counter() + KILL_WAIT_S  # until each is dead or a zombie (a grandchild's
        while time.perf_counter() < end and not all(_dead(psutil, p) for p in family):  # zombie
            time.sleep(0.01)  # waits for its new parent to reap it: psutil.wait_procs would hang)
        return
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True,
                       creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
    else:
        try:
            os.killpg(pid, signal.SIGKILL)  # started in its own session: its group is its tree
        except (ProcessLookupError, PermissionError):
            pass


def _dead(psutil, process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def exit_description(code: int | None) -> str:
    """'killed by SIGKILL ...' etc.: the one line a user gets when the process died."""
    if code is None:
        return "it stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (often the system ending it when memory ran out)" if name == "SIGKILL" else ""
        return f"it was killed by {name}{hint}"
    if os.name == "nt" and code & 0xFFFFFFFF in WINDOWS_CRASHES:
        return f"it crashed ({WINDOWS_CRASHES[code & 0xFFFFFFFF]}, code 0x{code & 0xFFFFFFFF:08X})"
    return f"it exited with code {code}"


class WorkerProcess:
    """One engine process: started on demand, kept warm across runs, killed on cancel.

    python: the interpreter (Slicer: its `PythonSlicer`; elsewhere sys.executable); env: the
    process environment (Slicer: `slicer.util.startupEnvironment()`, as launchConsoleProcess
    uses). launchConsoleProcess itself gives the child no stdin, which the protocol needs, so
    the process is started here with the same settings (hidden console on Windows).
    """

    def __init__(self, python: str | None = None, env: dict[str, str] | None = None,
                 idle_exit: float = IDLE_EXIT_S) -> None:
        self.python, self.env, self.idle_exit = python or sys.executable, env, idle_exit
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}  # the 'ready' event: torch version, cuda, mps
        self.log_path: Path | None = None
        self.started_at = 0.0
        self._reader: PipeReader | None = None
        self._buffer = b""
        self._eof = False
        self._log = None
        self._ids = itertools.count(1)
        self.busy = None  # the WorkerJob in flight

    # -- life cycle ----------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and not self._eof

    def start(self) -> None:
        if self.alive:
            return
        self.close()
        log_dir = Path(tempfile.mkdtemp(prefix="medgen-worker-"))
        self.log_path = log_dir / "worker.log"
        self._log = open(self.log_path, "wb")
        kwargs = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, bufsize=0,
                      env=self.env, cwd=str(log_dir))
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True  # its own group: killable as a tree, no terminal signals
        args = [self.python, "-c", BOOT, str(ENGINE_DIR), "--idle-exit", str(self.idle_exit)]
        self.proc = subprocess.Popen(args, **kwargs)
        self._reader, self._buffer, self._eof, self.info = PipeReader(self.proc.stdout), b"", False, {}
        self.started_at = time.perf_counter()

    def kill(self) -> None:
        """End the process tree now; returns within about a second."""
        if self.proc is not None and self.proc.poll() is None:
            kill_tree(self.proc.pid)
            try:
                self.proc.wait(KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.close()

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the process to quit (frees its GPU memory); kill it if it does not."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"cmd": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def close(self) -> None:
        """Drop the pipes of a process that has ended (the log file stays for the error message)."""
        if self.proc is not None:
            for pipe in (self.proc.stdin, self.proc.stdout):
                try:
                    pipe.close()
                except (OSError, AttributeError):
                    pass
            try:
                self.proc.wait(KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None
        self._eof = True

    # -- talking -------------------------------------------------------------------------------
    def submit(self, folder: str | Path) -> "WorkerJob":
        """Start the process if needed and hand it a job folder (written by medgen.io.jobs)."""
        if self.busy is not None and not self.busy.finished:
            raise WorkerError("a run is already in progress: wait for it or cancel it")
        self.start()
        job = WorkerJob(self, Path(folder), next(self._ids))
        try:
            self.send({"cmd": "run", "id": job.id, "folder": str(folder)})
        except OSError:
            pass  # the process died at once: the job's first poll reports how
        self.busy = job
        return job

    def send(self, message: dict) -> None:
        self.proc.stdin.write((json.dumps(message) + "\n").encode("utf-8"))
        self.proc.stdin.flush()

    def events(self) -> list[dict]:
        """Complete event lines received since the last call; never waits."""
        if self._reader is None or self._eof:
            return []
        data = self._reader.read()
        if data is None:
            self._eof = True
            data = b""
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        out = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "log", "text": line.decode("utf-8", "replace")}
            if event.get("event") == "ready":
                self.info = event
            out.append(event)
        return out

    @property
    def ended(self) -> bool:
        """True once the process has exited (or its output ended); its last lines may still be unread."""
        return self._eof or self.proc is None or self.proc.poll() is not None

    def exit_code(self, wait: float = 0.5) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path else ""
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class WorkerJob:
    """One run in the worker, followed by polling: progress, then output files or one error.

    state: running, done, failed or cancelled. Output files stay in `folder` until `discard()`.
    """

    def __init__(self, worker: WorkerProcess, folder: Path, job_id: int) -> None:
        self.worker, self.folder, self.id = worker, folder, job_id
        self.state = "running"
        self.fraction, self.message = 0.0, "starting the model process" if not worker.info else "queued"
        self.outputs: list[Path] = []
        self.report: list[list[str]] = []  # per example group, the self-check's lines: method, estimate
        self.error: WorkerError | None = None
        self.log: list[str] = []  # lines for the log panel, taken by the caller
        self.submitted = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @property
    def finished(self) -> bool:
        return self.state != "running"

    def poll(self) -> bool:
        """Read what the worker said since the last poll (never waits); True once finished."""
        if self.finished:
            return True
        self._handle_all(self.worker.events())
        if not self.finished and self.worker.ended:
            self._handle_all(self.worker.events())  # what it wrote before it exited
            if not self.finished:
                self._died()
        return self.finished

    def _handle_all(self, events: list[dict]) -> None:
        for event in events:
            if not self.finished:
                self._handle(event)

    def _handle(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "log":
            self.log.append(event["text"])
        elif kind == "hello":
            self.message = "loading the engine"
        elif kind == "ready":
            self.seconds["ready"] = time.perf_counter() - self.submitted
            self.log.append(f"engine ready: torch {event.get('torch')}, CUDA {'yes' if event.get('cuda') else 'no'}"
                            f" ({event.get('seconds')} s to import)")
        elif event.get("id") not in (self.id, None):
            return  # an earlier job's late line
        elif kind == "progress":
            self.fraction, self.message = float(event["fraction"]), str(event["message"])
        elif kind == "done":
            self.outputs = [self.folder / name for name in event["outputs"]]
            self.seconds.update(worker=event.get("seconds"), total=time.perf_counter() - self.submitted)
            self.fraction, self.message, self.state = 1.0, "done", "done"
            self.report = [list(group) for group in event.get("report") or []]
            self.log += [f"self-check: {line}" for group in self.report for line in group]
            self.log.append(f"run finished in {event.get('seconds')} s in the engine")
        elif kind == "error":
            self.error = WorkerError(event["message"], event.get("kind", "internal"), event.get("details", ""))
            self.state = "failed"
            self.log.append(f"error: {event['message']}")
        elif kind == "bye":  # an idle exit raced with this job: it was never read
            self.error = WorkerError("the model process had just stopped (idle): press Run again", "crash")
            self.state = "failed"

    def _died(self) -> None:
        how = exit_description(self.worker.exit_code())
        self.error = WorkerError(f"The model process stopped unexpectedly ({how}): nothing was written. "
                                 "Slicer is unaffected; press Run to start it again.", "crash",
                                 f"Last lines of its log ({self.worker.log_path}):\n{self.worker.log_tail()}")
        self.state = "failed"
        self.log.append(f"error: {self.error}")
        self.worker.close()

    def cancel(self) -> None:
        """Kill the worker now (its tree, within about a second); nothing reaches the scene."""
        if self.finished:
            return
        self.worker.kill()
        self.state, self.message = "cancelled", "cancelled"
        self.log.append("cancelled: the model process was stopped")

    def take_log(self) -> list[str]:
        lines, self.log = self.log, []
        return lines

    def wait(self, timeout: float | None = None, cancel: Callable[[], bool] | None = None,
             progress: Callable[[float, str], None] | None = None, interval: float = 0.05) -> bool:
        """Blocking follow-up for scripts and tests: poll, report progress, cancel on request."""
        end = None if timeout is None else time.perf_counter() + timeout
        while not self.poll():
            if cancel is not None and cancel():
                self.cancel()
                break
            if progress is not None:
                progress(self.fraction, self.message)
            if end is not None and time.perf_counter() > end:
                return False
            time.sleep(interval)
        if progress is not None and self.state == "done":
            progress(1.0, "done")
        return True

    def discard(self) -> None:
        """Remove the job folder (inputs and outputs)."""
        shutil.rmtree(self.folder, ignore_errors=True)


__all__ = ["WorkerProcess", "WorkerJob", "WorkerError", "PipeReader", "kill_tree", "exit_description"]
