"""Property-based fuzz of the image readers (issue 10): random dtypes, shapes and formats, files
cut at random offsets and header bytes overwritten at random.

The rule checked on every example: a read either succeeds with a complete, correct image (the
exact voxels written, for a file that still holds all of them) or is refused with one InputError
line; through the CLI a refusal is exit 2, one `medgen: error:` line, no new file and every
existing file byte-identical. Never another exception, never zero-filled or NaN voxels.

The voxels come from the shipped MNI152 sample (a real image), cast to the drawn dtype. Seeded
(derandomize) so that CI runs the same examples every time; about 10 s.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medgen_helpers import SAMPLE_T1, files_in
from medgen import cli
from medgen.core.errors import InputError
from medgen.io.images import read_volume

DTYPES = ("uint8", "int16", "uint16", "int32", "float32", "float64")
FORMATS = ((".nii", False), (".nii.gz", True), (".nrrd", True), (".nrrd", False), (".mha", True),
           (".mha", False))
_T1 = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_T1)))


def _voxels(dtype: str, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A block of the real T1 sample, scaled into the dtype's range (floats keep fractions)."""
    rng = np.random.default_rng(seed)
    corner = [int(rng.integers(0, s - n + 1)) for s, n in zip(_T1.shape, shape)]
    block = _T1[tuple(slice(c, c + n) for c, n in zip(corner, shape))].astype(np.float64)
    if np.dtype(dtype).kind == "f":
        return (block / 7.0 - 3.0).astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(block * (info.max / max(block.max(), 1)) * 0.9, info.min, info.max).astype(dtype)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = (draw(st.integers(1, 4)), draw(st.integers(2, 12)), draw(st.integers(2, 12)))
    suffix, compress = draw(st.sampled_from(FORMATS))
    mutation = draw(st.sampled_from(("none", "truncate", "header")))  # header: any byte of a compressed file
    where = draw(st.floats(0.0, 1.0, exclude_max=True))
    byte = draw(st.integers(0, 255))
    seed = draw(st.integers(0, 2**16))
    return dtype, shape, suffix, compress, mutation, where, byte, seed


@settings(max_examples=70, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=cases())
def test_reader_complete_or_refused(case, tmp_path_factory: pytest.TempPathFactory, capfd) -> None:
    dtype, shape, suffix, compress, mutation, where, byte, seed = case
    folder = tmp_path_factory.mktemp("fuzz")
    original = _voxels(dtype, shape, seed)
    clean = folder / f"clean{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(original), str(clean), useCompression=compress)
    data = clean.read_bytes()
    header = len(data) - (0 if compress else original.nbytes)
    if mutation == "truncate":
        data = data[:int(len(data) * where)]
    elif mutation == "header":
        at = int(max(header, 1) * where)
        data = data[:at] + bytes([byte]) + data[at + 1:]
    path = folder / f"fuzzed{suffix}"
    path.write_bytes(data)

    try:
        volume = read_volume(path)
    except InputError as err:
        assert "\n" not in str(err) and str(path) in str(err)
        _cli_refuses(path, folder, capfd)
        return
    complete = path.stat().st_size >= clean.stat().st_size or mutation == "header"
    assert complete or compress, f"a file cut to {len(data)} bytes was read (payload {original.nbytes})"
    if mutation != "header":
        np.testing.assert_array_equal(volume.array.reshape(original.shape), original)
    else:  # a header byte changed yet still readable: complete and finite, never zero-filled
        assert volume.array.size > 0
        if volume.array.dtype.kind == "f":
            assert np.isfinite(volume.array).all()


def _cli_refuses(path: Path, folder: Path, capfd) -> None:
    """The same file through the real CLI: exit 2, one line, nothing new, nothing changed."""
    out = folder / "existing.nii.gz"
    out.write_bytes(b"user data that must survive")
    before = _digest(folder)
    capfd.readouterr()
    code = cli.main(["run", "--task", "denoise", "--image", str(path), "--context-target", str(path),
                     "--out", str(out), "--quiet", "--device", "cpu"])
    err = capfd.readouterr().err
    assert code == cli.EXIT_USAGE, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("medgen: error:"), err
    assert _digest(folder) == before, files_in(folder)
