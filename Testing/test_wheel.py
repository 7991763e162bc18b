"""The built wheel works outside the checkout: what a user gets from `pip install` of a release.

Builds the wheel from this tree, installs it (no dependencies) into a fresh virtual environment
in a temporary folder, and runs the installed `medgen` from another folder with no PYTHONPATH.
The dependencies (torch, MONAI, ...) come from the running environment through a plain path
line in a .pth file: such a line adds site-packages but does not run the .pth files inside it,
so the editable install of this checkout stays invisible and only the wheel's files can be used.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from medgen_helpers import REPO_ROOT, SAMPLE_T1

pytestmark = pytest.mark.model  # runs the shipped weights from the installed wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), str(REPO_ROOT)], check=True, cwd=tmp)
    wheel = next((tmp / "dist").glob("*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    (purelib / "_medgen_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    str(wheel)], check=True)
    return venv


def _medgen(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([str(venv / "bin" / "medgen"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_wheel_holds_the_runtime_and_its_data_only(installed: Path) -> None:
    python = installed / "bin" / "python"
    code = ("import medgen, importlib.util as u; print(medgen.__file__); "
            "print(u.find_spec('medgen_dev'), u.find_spec('MedicalGeneralistLib'))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(python), "-c", code], cwd=installed, env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[0].startswith(str(installed)), out  # the wheel's copy, not the checkout's
    assert out[1] == "None None", out  # developer and Slicer code never ship in the wheel


def test_models_list_and_verify(installed: Path, tmp_path: Path) -> None:
    listed = _medgen(installed, "models", "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "medgen-small" in listed.stdout and "[available]" in listed.stdout
    verified = _medgen(installed, "models", "verify", "medgen-small", cwd=tmp_path)
    assert verified.returncode == 0, verified.stderr


def test_demo_and_run(installed: Path, tmp_path: Path) -> None:
    demo = _medgen(installed, "demo", "--out", str(tmp_path / "demo"), cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert (tmp_path / "demo" / "montage.png").is_file()
    import SimpleITK as sitk

    image = sitk.ReadImage(str(SAMPLE_T1))[:, :, 40:44]
    sitk.WriteImage(image, str(tmp_path / "t1.nii.gz"))
    run = _medgen(installed, "run", "--task", "denoise", "--image", str(tmp_path / "t1.nii.gz"),
                  "--context-target", str(tmp_path / "t1.nii.gz"), "--context-slices", "1,2",
                  "--out", str(tmp_path / "out.nii.gz"), "--quiet", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out.nii.gz")))
    assert out.shape == sitk.GetArrayFromImage(image).shape and np.isfinite(out).all()


def test_developer_commands_say_they_need_a_checkout(installed: Path, tmp_path: Path) -> None:
    bench = _medgen(installed, "bench", "--quick", cwd=tmp_path)
    assert bench.returncode == 2
    assert "developer command" in bench.stderr and "checkout" in bench.stderr
