"""The engine process the Slicer module runs the model in (medgen.worker + worker_client), end to end.

Real parts throughout: real MRML scenes from slicer-core, the shipped MNI152 sample and model,
real child processes (sys.executable stands in for Slicer's PythonSlicer; a launcher script
stands in for PythonSlicer's launcher, whose child runs Python), real signals for crashes.
Also here: the dependency check on a Python with nothing installed, the free-memory query on
each platform's branch, and that the module's GUI-side code never imports torch.
"""

from __future__ import annotations

import ast
import ctypes
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from test_slicer_scene import T1, Scene, mrml, slicer  # noqa: F401

from MedicalGeneralistLib import dependencies  # noqa: E402
from MedicalGeneralistLib import slicer_io  # noqa: E402
from MedicalGeneralistLib import slicer_run as sr  # noqa: E402
from MedicalGeneralistLib.worker_client import WorkerError, WorkerProcess, exit_description  # noqa: E402
from medgen.io import jobs  # noqa: E402

MODULE_DIR = Path(__file__).resolve().parents[1] / "MedicalGeneralist"
NAMES = ["grey matter", "white matter"]
POSIX = pytest.mark.skipif(os.name == "nt", reason="POSIX signals and libc")


def _request(mrml: Scene, **changes) -> sr.RunRequest:
    t1 = mrml.load_volume(T1, "t1")
    seg = mrml.tissue_segmentation(t1)
    base = dict(input_volume=t1, task="segment", examples=[slicer_io.ExampleSlice(t1, 0, 36, seg), slicer_io.ExampleSlice(t1, 0, 42, seg)],
                segment_names=NAMES, device="cpu", modality="mr", range_mode="between")
    return sr.RunRequest(**{**base, **changes})


def _launcher(tmp_path: Path) -> str:
    """A stand-in for PythonSlicer: a launcher process that runs Python as its child and waits."""
    script = tmp_path / "launcher.py"
    script.write_text("import subprocess, sys\nsys.exit(subprocess.call([sys.executable] + sys.argv[1:]))\n")
    wrapper = tmp_path / "PythonSlicer"
    wrapper.write_text(f"#!/bin/sh\n'{sys.executable}' '{script}' \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


def _gone(psutil, process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_for(predicate, timeout: float, interval: float = 0.02) -> bool:
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        if predicate():
            return True
        time.sleep(interval)
    return False


# -- job files -------------------------------------------------------------------------------
@pytest.mark.slicer
def test_job_folder_holds_the_cut_volume_and_example_slices_only(mrml: Scene, tmp_path: Path) -> None:
    prepared = sr.prepare(_request(mrml))
    job = jobs.Job(prepared.image, [g.examples for g in prepared.groups], prepared.options, None, None)
    jobs.write_job(job, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["examples.npz", "image.nrrd", "job.json"]
    with np.load(tmp_path / "examples.npz") as arrays:
        assert all(arrays[k].ndim == 2 for k in arrays.files)  # slices, never a full-volume mask
        assert len(arrays.files) == 2 * 2  # two examples, image + target each
    back = jobs.read_job(tmp_path)
    assert back.image.shape == prepared.image.shape == (7,) + prepared.full_shape[1:]  # slices 36..42
    np.testing.assert_array_equal(back.image.array, prepared.image.array)
    assert back.image.spacing == prepared.image.spacing and back.image.direction == prepared.image.direction
    assert back.options == prepared.options
    for mine, theirs in zip(prepared.groups[0].examples, back.groups[0]):
        np.testing.assert_array_equal(mine.image, theirs.image)
        np.testing.assert_array_equal(mine.target, theirs.target)
        assert (mine.image_norm, mine.slice_index, mine.spacing) == (theirs.image_norm, theirs.slice_index, theirs.spacing)


# -- the protocol, end to end ----------------------------------------------------------------
@pytest.mark.slicer
@pytest.mark.model
def test_protocol_start_progress_results_and_warm_reuse(mrml: Scene, record_property) -> None:
    worker = WorkerProcess()
    try:
        request = _request(mrml)
        before = mrml.snapshot()
        timings, pids = [], []
        for _ in range(2):
            prepared = sr.prepare(request)
            start = time.perf_counter()
            job = sr.submit(prepared, worker)
            messages, fractions = [], []
            while not job.poll():
                messages.append(job.message)
                fractions.append(job.fraction)
                time.sleep(0.02)
            assert job.state == "done", job.error
            node = sr.finish(prepared, job)
            timings.append(time.perf_counter() - start)
            pids.append(worker.proc.pid)
            assert fractions == sorted(fractions) and job.fraction == 1.0
            assert not job.folder.exists()  # inputs and outputs removed once written
            assert slicer_io.segment_names(node) == NAMES
            # the self-check's lines come back named after the segments, with the chosen method
            # and its leave-one-out estimate from the two labelled slices
            lines = sr.report_lines(prepared, job)
            assert [line.split(":")[0] for line in lines] == NAMES, lines
            assert all("estimated Dice" in line and "from 2 labelled slices" in line for line in lines), lines
        assert worker.info["torch"] and "cuda" in worker.info  # the 'ready' event
        assert pids[0] == pids[1] and worker.alive  # the second run reused the warm process
        assert any(m not in ("starting the model process", "loading the engine", "queued") for m in messages)
        after = mrml.snapshot()
        assert after["ids"][:len(before["ids"])] == before["ids"] and len(after["ids"]) > len(before["ids"])
        assert {k: after["arrays"][k] for k in before["arrays"]} == before["arrays"]  # inputs untouched
        masks = slicer_io.segment_masks(node, NAMES, request.input_volume)
        truth = slicer_io.segment_masks(request.examples[0].target, NAMES, request.input_volume)
        for name in NAMES:
            np.testing.assert_array_equal(masks[name][36], truth[name][36])
            assert not masks[name][:36].any() and not masks[name][43:].any() and masks[name][37:42].any()
        record_property("cold_seconds", round(timings[0], 2))
        record_property("warm_seconds", round(timings[1], 2))
        assert timings[1] < timings[0]
    finally:
        worker.stop()
    assert not worker.alive


@pytest.mark.slicer
@pytest.mark.model
@POSIX
def test_cancel_mid_run_kills_the_tree_within_a_second_and_changes_nothing(mrml: Scene, tmp_path: Path,
                                                                           record_property) -> None:
    psutil = pytest.importorskip("psutil")
    worker = WorkerProcess(python=_launcher(tmp_path))
    prepared = sr.prepare(_request(mrml, range_mode="whole", mode="independent"))
    before = mrml.snapshot()
    job = sr.submit(prepared, worker)
    assert _wait_for(lambda: job.poll() or job.fraction > 0, 300), job.error
    assert job.state == "running"
    family = psutil.Process(worker.proc.pid).children(recursive=True) + [psutil.Process(worker.proc.pid)]
    assert len(family) >= 2  # launcher + Python, as with PythonSlicer
    start = time.perf_counter()
    job.cancel()
    record_property("cancel_seconds", round(time.perf_counter() - start, 3))
    assert time.perf_counter() - start < 1.0
    assert all(_gone(psutil, p) for p in family)
    assert job.state == "cancelled" and not worker.alive
    assert sr.finish(prepared, job) is None
    assert mrml.snapshot() == before  # node ids and voxels
    assert not job.folder.exists()


@pytest.mark.slicer
@POSIX
@pytest.mark.parametrize("sig, words", [(signal.SIGKILL, "SIGKILL"), (signal.SIGSEGV, "SIGSEGV")])
def test_a_worker_that_dies_gives_one_message_and_no_node(mrml: Scene, sig, words) -> None:
    worker = WorkerProcess()
    prepared = sr.prepare(_request(mrml))
    before = mrml.snapshot()
    job = sr.submit(prepared, worker)
    assert _wait_for(lambda: job.poll() or job.message != "starting the model process", 60)
    os.kill(worker.proc.pid, sig)  # the system's OOM killer; a crash in native code
    assert _wait_for(job.poll, 10)
    assert job.state == "failed" and job.error.kind == "crash"
    message = str(job.error)
    assert words in message and "nothing was written" in message and "\n" not in message
    with pytest.raises(WorkerError, match=words):
        sr.finish(prepared, job)
    assert mrml.snapshot() == before and not job.folder.exists()
    # the next run starts a fresh process
    job = sr.submit(sr.prepare(_request(mrml)), worker)
    assert _wait_for(lambda: worker.alive, 5)
    job.cancel()


def test_idle_worker_ends_itself_and_a_closed_stdin_ends_it() -> None:
    """No orphan holding memory: after the idle time, or when Slicer (its stdin) goes away."""
    worker = WorkerProcess(idle_exit=1.0)
    worker.start()
    assert worker.proc.wait(60) == 0
    events = [e["event"] for e in worker.events()]
    assert events[:2] == ["hello", "ready"] and events[-1] == "bye"
    worker = WorkerProcess()
    worker.start()
    worker.proc.stdin.close()
    assert worker.proc.wait(60) == 0


def test_exit_descriptions_name_the_cause() -> None:
    assert "SIGKILL" in exit_description(-9) and "memory" in exit_description(-9)
    assert "code 3" in exit_description(3)
    assert "stopped answering" in exit_description(None)


@pytest.mark.slicer
def test_setup_error_when_the_engine_cannot_import(tmp_path: Path) -> None:
    """A Python without the engine's packages (torch...): one 'setup' message, not a hang."""
    bare = tmp_path / "bare-python"
    bare.write_text(f"#!/bin/sh\nexec '{sys.executable}' -I -S \"$@\"\n")
    bare.chmod(0o755)
    worker = WorkerProcess(python=str(bare))
    job = worker.submit(tmp_path)
    assert _wait_for(job.poll, 30)
    assert job.state == "failed" and job.error.kind == "setup" and "cannot import" in str(job.error)


# -- polling while the main thread holds the GIL (Slicer's situation) -------------------------
def _slicer_like_idle(seconds: float) -> None:
    """Idle the way Slicer's main thread does: inside C code (Qt's event loop) WITHOUT releasing
    the GIL (PythonQt's thread support is off). libc's usleep through ctypes.PyDLL keeps the GIL."""
    ctypes.PyDLL(None).usleep(int(seconds * 1e6))


@pytest.mark.slicer
@pytest.mark.model
@POSIX
def test_run_completes_at_full_speed_under_a_gil_holding_100ms_poll(mrml: Scene, record_property) -> None:
    worker = WorkerProcess()
    try:
        request = _request(mrml)
        warm = sr.submit(sr.prepare(request), worker)  # warm up: imports, model
        assert warm.wait(300) and warm.state == "done", warm.error
        warm.discard()
        free = sr.submit(sr.prepare(request), worker)
        start = time.perf_counter()
        assert free.wait(300) and free.state == "done"
        free_s = time.perf_counter() - start
        free.discard()

        prepared = sr.prepare(request)
        start = time.perf_counter()
        job = sr.submit(prepared, worker)
        while not job.poll():  # the widget's QTimer tick, between GIL-holding idles
            _slicer_like_idle(0.1)
        held_s = time.perf_counter() - start
        assert job.state == "done" and slicer_io.segment_names(sr.finish(prepared, job)) == NAMES
        record_property("free_poll_seconds", round(free_s, 2))
        record_property("gil_held_poll_seconds", round(held_s, 2))
        assert held_s < 1.5 * free_s + 0.5  # the process does not care what Slicer's GIL does
    finally:
        worker.stop()


@POSIX
def test_a_thread_is_starved_by_the_same_main_loop(record_property) -> None:
    """Why the engine left the thread: under a GIL-holding idle, a Python thread barely runs."""
    def work() -> None:  # pure Python, like the engine's glue between torch calls
        total = 0
        for i in range(2_000_000):
            total += i

    def timed(idle: bool) -> float:
        thread = threading.Thread(target=work)
        start = time.perf_counter()
        thread.start()
        while thread.is_alive():
            if idle:
                _slicer_like_idle(0.1)  # the thread runs only in the gaps between these
            else:
                thread.join(0.1)
        return time.perf_counter() - start

    free, held = timed(False), timed(True)
    record_property("thread_slowdown", round(held / free, 1))
    assert held > 3 * free


# -- dependencies ----------------------------------------------------------------------------
def test_dependency_check_on_a_python_with_nothing_installed() -> None:
    """`python -I -S`: no site-packages at all (no torch, no numpy, no packaging, no itk)."""
    code = textwrap.dedent("""
        import json, sys
        sys.path.insert(0, sys.argv[1])
        from MedicalGeneralistLib import dependencies as d
        print(json.dumps({"missing": d.missing(), "torch": d.torch_problem(),
                          "itk": d.importable("itk.MorphologicalContourInterpolationPython"),
                          "numpy": "numpy" in sys.modules, "torch_loaded": "torch" in sys.modules}))
    """)
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(MODULE_DIR)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["missing"] == ["torch"] + [m for _r, m in dependencies.PIP_REQUIREMENTS]
    assert answer["torch"] == "PyTorch is not installed"
    assert answer["itk"] is False and not answer["numpy"] and not answer["torch_loaded"]


def test_dependency_check_here_reads_versions_without_importing() -> None:
    code = ("import sys; from MedicalGeneralistLib import dependencies as d; "
            "print(d.torch_problem(), d.missing(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(MODULE_DIR)})
    assert out.stdout.split() == ["None", "[]", "False"], out.stderr


def test_torch_version_requirement(monkeypatch: pytest.MonkeyPatch) -> None:
    for version, ok in [("2.13.0+cpu", True), ("2.2.0", True), ("2.1.2+cu118", False), ("1.13.1", False)]:
        assert dependencies.version_satisfies(version, ">=2.2") is ok
        monkeypatch.setitem(sys.modules, "packaging.specifiers", None)  # Slicer without `packaging`
        assert dependencies.version_satisfies(version, ">=2.2") is ok
        monkeypatch.undo()
    monkeypatch.setattr(dependencies.importlib.metadata, "version", lambda name: "2.0.1")
    assert dependencies.torch_problem() == "PyTorch 2.0.1 is installed but >=2.2 is needed"


def test_pip_requirements_leave_slicers_own_packages_alone() -> None:
    names = {r.split(">")[0].split("=")[0].lower() for r, _m in dependencies.PIP_REQUIREMENTS}
    assert not names & {"simpleitk", "vtk", "numpy", "itk", "torch", "itk-morphologicalcontourinterpolation"}
    assert {"simpleitk", "vtk", "numpy", "itk", "torch"} <= {p.lower() for p in dependencies.PROTECTED_PACKAGES}


# -- torch stays out of Slicer's process -----------------------------------------------------
GUI_SIDE = ["MedicalGeneralistLib.dependencies", "MedicalGeneralistLib.worker_client", "MedicalGeneralistLib.slicer_io",
            "MedicalGeneralistLib.slicer_run", "medgen.io.weights", "medgen.io.jobs"]


@pytest.mark.slicer
def test_module_side_code_never_imports_torch() -> None:
    """Everything MedicalGeneralist.py imports (at the top or inside its methods) is torch-free."""
    tree = ast.parse((MODULE_DIR / "MedicalGeneralist.py").read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    ours = set()
    for node in ast.walk(tree):  # `from package import submodule` names the submodule
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("medgen", "MedicalGeneralistLib"):
            folder = MODULE_DIR.joinpath(*node.module.split("."))
            ours |= {f"{node.module}.{a.name}" if (folder / f"{a.name}.py").is_file() else node.module
                     for a in node.names}
    assert "torch" not in imported and ours <= set(GUI_SIDE), ours - set(GUI_SIDE)
    code = ("import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\n"
            "from medgen.io import weights; weights.list_models()\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *GUI_SIDE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(MODULE_DIR)})
    assert out.stdout.strip() == "False", out.stderr


# -- free memory on each platform ------------------------------------------------------------
class _FakeMemory:
    available = 3 * 1024**3


def _no_psutil(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` now raises ImportError


def test_free_memory_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from medgen.core import device

    psutil = pytest.importorskip("psutil")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: _FakeMemory())
    assert device.free_bytes(torch.device("cpu")) == _FakeMemory.available
    _no_psutil(monkeypatch)  # Linux without psutil: the kernel's page counts
    monkeypatch.setattr(device.os, "sysconf_names", {"SC_AVPHYS_PAGES": 86, "SC_PAGE_SIZE": 30}, raising=False)
    monkeypatch.setattr(device.os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}[name],
                        raising=False)
    assert device.free_bytes(torch.device("cpu")) == 4096 * 1000


def test_free_memory_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows has no os.sysconf at all: psutil, or the fixed guess; never an AttributeError."""
    import torch
    from medgen.core import device

    monkeypatch.delattr(device.os, "sysconf", raising=False)
    monkeypatch.delattr(device.os, "sysconf_names", raising=False)
    psutil = pytest.importorskip("psutil")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: _FakeMemory())
    assert device.free_bytes(torch.device("cpu")) == _FakeMemory.available
    _no_psutil(monkeypatch)
    assert device.free_bytes(torch.device("cpu")) == device.FALLBACK_FREE_BYTES
    assert 1 <= device.batch_limit(10**6, torch.device("cpu")) <= 64


def test_free_memory_macos(monkeypatch: pytest.MonkeyPatch) -> None:
    """macOS has sysconf but no SC_AVPHYS_PAGES; MPS memory comes from torch's own accounting."""
    import torch
    from medgen.core import device

    _no_psutil(monkeypatch)
    names = {k: v for k, v in getattr(os, "sysconf_names", {}).items() if k != "SC_AVPHYS_PAGES"}
    monkeypatch.setattr(device.os, "sysconf_names", names, raising=False)
    assert device.free_bytes(torch.device("cpu")) == device.FALLBACK_FREE_BYTES
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 10 * 1024**3, raising=False)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 9 * 1024**3, raising=False)
    assert device.free_bytes(torch.device("mps")) == 1024**3  # Metal's budget is the tighter one
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 0, raising=False)
    assert device.free_bytes(torch.device("mps")) == device.FALLBACK_FREE_BYTES  # then the host's


def test_worker_reports_out_of_memory_as_such() -> None:
    from medgen.worker import Engine

    engine = Engine()
    assert engine._describe(MemoryError())[0] == "memory"
    assert engine._describe(RuntimeError("MPS backend out of memory (MPS allocated: 8 GB)"))[0] == "memory"
    kind, text = engine._describe(ValueError("bad"))
    assert kind == "internal" and "ValueError: bad" in text


# -- the Segment Editor effect through the worker --------------------------------------------
@pytest.mark.slicer
@pytest.mark.model
def test_effect_runner_in_the_worker_matches_the_in_process_engine(mrml: Scene) -> None:
    from test_slicer_effect import PAINTED, Case

    from MedicalGeneralistLib import effect_logic as fx
    from medgen.io.weights import load_model

    case = Case(mrml)
    job = fx.make_job(case.volume, case.seg, case.segment_id, device="cpu")
    here = fx.in_process_runner(load_model(None)[0])(job, lambda f, m: None, lambda: False)
    worker = WorkerProcess()
    try:
        fractions = []
        there = sr.engine_job_runner(worker)(job, lambda f, m: fractions.append(f), lambda: False)
        assert fractions and fractions[-1] == 1.0
        for k in PAINTED:
            np.testing.assert_array_equal(there[k], case.truth[k])
        assert 2 * (here & there).sum() / (here.sum() + there.sum()) > 0.98  # same engine, other process
        assert sr.engine_job_runner(worker)(job, lambda f, m: None, lambda: True) is None  # cancelled
        assert not worker.alive
    finally:
        worker.stop()
