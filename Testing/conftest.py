"""Shared fixtures for the engine, CLI and data tests.

Environment set here, before any test module imports torch:
- HF_HUB_OFFLINE=1: no test may touch the network (registry models resolve from local files).
- 2 torch threads and OMP_WAIT_POLICY=PASSIVE: on a shared 2-core machine (a CI runner, or a
  developer box with a training job running) OpenMP's default busy-waiting makes every
  convolution 10-20x slower; with passive waiting the whole folder runs in about a minute.
  MEDGEN_TEST_THREADS=1 lowers the thread count further.

Tiers: `pytest -m "not model and not data and not slicer" Testing` is the fast unit tier (no
trained weights, no ../shared/data, no slicer-core; under a minute); the whole folder is what CI runs.

Real images only: fixtures cut small pieces out of the shipped MNI152 sample
(Resources/SampleData) and out of ../shared/data (tests needing it skip with a reason without it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("KMP_WARNINGS", "0")

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT / "MedicalGeneralist", Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(int(os.environ.get("MEDGEN_TEST_THREADS", "2")), 2)))

from medgen_helpers import SAMPLE_T1, SAMPLE_TISSUE, SHARED_DATA, Case, write_case  # noqa: E402
from medgen.io import images as imageio
from medgen.io import weights  # noqa: E402
from medgen.core.volume import Volume  # noqa: E402


_SCORES: list[tuple[str, str, object]] = []
# Tiers (README "Tests"): a test is marked by what it needs, from the fixtures it uses, so the
# markers cannot drift from the code. Tests that load the shipped weights without the `model`
# fixture (the CLI in a subprocess, say) carry `pytestmark = pytest.mark.model` themselves.
_TIER_FIXTURES = {"model": "model", "shared_data": "data"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, marker in _TIER_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)
        if Path(str(item.fspath)).name.startswith("test_slicer"):
            item.add_marker("slicer")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Collect quality figures tests record with `record_property("dice_...", value)`."""
    if report.when == "call":
        _SCORES.extend((report.nodeid, k, v) for k, v in report.user_properties if k.startswith("dice"))


def pytest_terminal_summary(terminalreporter) -> None:
    if _SCORES:
        terminalreporter.section("recorded quality (agreement with reference labels)")
        for nodeid, key, value in _SCORES:
            terminalreporter.write_line(f"{key} = {value}    ({nodeid})")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA} (../shared/data beside the "
                    "repository root): this test needs the real images there")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample_t1() -> Volume:
    return imageio.read_volume(SAMPLE_T1)


@pytest.fixture(scope="session")
def sample_tissue() -> Volume:
    return imageio.read_volume(SAMPLE_TISSUE, label=True)


@pytest.fixture(scope="session")
def model():
    """The shipped default model (`weights.load_model()`), loaded once per session, on CPU."""
    net, _info = weights.load_model()
    return net


@pytest.fixture
def small_case(tmp_path: Path) -> Case:
    """10 axial slices (94 x 77, 2 mm) of the MNI152 sample + labels 3 (GM) / 7 (WM), as NIfTI."""
    return write_case(tmp_path / "case")
