"""`medgen batch`: byte-identical to `medgen run`, resumable, failures journaled, torchrun-sharded.

Real processes throughout: `medgen run` and `medgen batch` as subprocesses (what users call),
torchrun's elastic launcher with 2 CPU processes over gloo. The cases are small real crops of
../shared/data (pyradiomics lesions with their labels) and of the shipped MNI152 sample.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medgen_helpers import REPO_ROOT, SHARED_DATA, write_case

pytestmark = [pytest.mark.model]
ENV = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "MedicalGeneralist"), OMP_WAIT_POLICY="PASSIVE",
           OMP_NUM_THREADS="1")


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run in its own session; on timeout end that whole group (torchrun's workers too)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _medgen(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "medgen", *argv], timeout)


def _lesion_case(name: str, folder: Path) -> tuple[Path, Path, str]:
    """A pyradiomics lesion cropped to its slab and a box around it, with 2 labelled slices."""
    img = sitk.ReadImage(str(SHARED_DATA / "pyradiomics" / f"{name}_image.nrrd"))
    lab = sitk.ReadImage(str(SHARED_DATA / "pyradiomics" / f"{name}_label.nrrd"))
    arr = sitk.GetArrayFromImage(lab)
    z, y, x = (np.nonzero(arr.any(axes))[0] for axes in ((1, 2), (0, 2), (0, 1)))
    lo = [max(int(v[0]) - 2, 0) for v in (x, y, z)]
    hi = [min(int(v[-1]) + 3, s) for v, s in zip((x, y, z), img.GetSize())]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    img, lab = img[box], lab[box]
    sitk.WriteImage(img, str(folder / f"{name}.nii.gz"))
    sitk.WriteImage(lab, str(folder / f"{name}_label.nii.gz"))
    present = np.nonzero(sitk.GetArrayFromImage(lab).any((1, 2)))[0]
    return folder / f"{name}.nii.gz", folder / f"{name}_label.nii.gz", f"{present[0]},{present[-1]}"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Three real cases (two lesions from shared data, the MNI sample) and one broken row."""
    if not (SHARED_DATA / "pyradiomics").is_dir():
        pytest.skip(f"needs ../shared/data ({SHARED_DATA})")
    folder = tmp_path_factory.mktemp("batch")
    rows = []
    for name in ("brain1", "breast1"):
        image, label, slices = _lesion_case(name, folder)
        rows.append({"image": image.name, "labels": label.name, "slices": slices, "output": f"out/{name}.nii.gz"})
    mni = write_case(folder / "mni")
    rows.append({"image": "mni/t1.nii.gz", "labels": "mni/labels.nii.gz", "slices": "1,8",
                 "output": "out/mni.nii.gz", "options": "--modality mr"})
    rows.append({"image": "missing.nii.gz", "labels": label.name, "output": "out/missing.nii.gz"})
    (folder / "out").mkdir()
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "labels", "slices", "output", "options"])
        writer.writeheader()
        writer.writerows(rows)
    assert mni.image.exists()
    return path


@pytest.mark.data
def test_batch_matches_run_and_resumes(manifest: Path) -> None:
    folder = manifest.parent
    single = _medgen("batch", str(manifest))
    assert single.returncode == 1, single.stderr  # one case failed, the others ran
    journal = [json.loads(line) for line in (folder / "manifest.csv.journal.jsonl").read_text().splitlines()]
    status = {Path(e["output"]).name: e for e in journal}
    assert {k: v["status"] for k, v in status.items()} == {
        "brain1.nii.gz": "done", "breast1.nii.gz": "done", "mni.nii.gz": "done", "missing.nii.gz": "failed"}
    reason = status["missing.nii.gz"]["reason"]
    assert "missing.nii.gz" in reason and "\n" not in reason
    assert not (folder / "out" / "missing.nii.gz").exists()
    assert "3 done, 1 failed" in single.stdout and "| out/" not in single.stdout

    # the same case through `medgen run` gives the same bytes
    ref = folder / "ref_brain1.nii.gz"
    run = _medgen("run", "--task", "segment", "--image", str(folder / "brain1.nii.gz"), "--context-target",
                  str(folder / "brain1_label.nii.gz"), "--context-slices", _slices(manifest, "brain1"),
                  "--out", str(ref), "--quiet")
    assert run.returncode == 0, run.stderr
    assert ref.read_bytes() == (folder / "out" / "brain1.nii.gz").read_bytes()
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(ref)))
    assert labels.any()

    # resumable: finished cases are skipped, a removed output is made again
    (folder / "out" / "breast1.nii.gz").unlink()
    again = _medgen("batch", str(manifest))
    assert "3 already done" not in again.stderr and "2 already done, 2 to run" in again.stderr
    assert (folder / "out" / "breast1.nii.gz").exists()


def _slices(manifest: Path, name: str) -> str:
    with open(manifest, newline="") as f:
        return next(r["slices"] for r in csv.DictReader(f) if r["image"] == f"{name}.nii.gz")


@pytest.mark.data
def test_torchrun_two_processes_same_outputs(manifest: Path, tmp_path: Path) -> None:
    """2 CPU ranks (gloo) share the manifest; outputs equal the single-process ones byte for byte."""
    folder = manifest.parent
    if not (folder / "out" / "mni.nii.gz").exists():
        assert _medgen("batch", str(manifest)).returncode == 1
    single = {p.name: p.read_bytes() for p in (folder / "out").iterdir()}
    shard = tmp_path / "shard"
    shutil.copytree(folder, shard, ignore=shutil.ignore_patterns("out", "*.jsonl*"))
    (shard / "out").mkdir()
    torchrun = Path(sys.executable).with_name("torchrun")
    done = _run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "medgen",
                 "batch", str(shard / "manifest.csv")])
    assert done.returncode != 0  # the broken row fails on its rank, and torchrun reports it
    journals = sorted(p.name for p in shard.glob("manifest.csv.journal.jsonl*"))
    assert journals == ["manifest.csv.journal.jsonl.rank0", "manifest.csv.journal.jsonl.rank1"]
    ranks = {json.loads(line)["rank"] for j in journals for line in (shard / j).read_text().splitlines()}
    assert ranks == {0, 1}
    sharded = {p.name: p.read_bytes() for p in (shard / "out").iterdir()}
    assert sharded.keys() == single.keys() == {"brain1.nii.gz", "breast1.nii.gz", "mni.nii.gz"}
    assert sharded == single
    assert "3 done, 1 failed" in done.stdout


def test_bad_manifest_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "m.csv"
    bad.write_text("image,output,colour\na.nii.gz,b.nii.gz,red\n")
    done = _medgen("batch", str(bad))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "colour" in done.stderr
    assert not list(tmp_path.glob("*.jsonl*"))
