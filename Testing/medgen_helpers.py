"""Helpers shared by the test modules (imported as a plain module: Testing/ is on sys.path)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLE_DIR = REPO_ROOT / "MedicalGeneralist" / "medgen" / "resources" / "SampleData"
SAMPLE_T1 = SAMPLE_DIR / "mni152_t1_2mm.nii.gz"
SAMPLE_TISSUE = SAMPLE_DIR / "mni152_tissue_2mm.nii.gz"

# The small case: 10 axial slices through the middle of the MNI152 sample (axial = numpy axis 0
# there), tissue labels remapped from 1/2 to 3/7 so that tests prove label values are kept.
SMALL_SLICES = (35, 45)
LABEL_MAP = {1: 3, 2: 7}


@dataclass
class Case:
    """A small real 3D case on disk: image, full labels (3 = GM, 7 = WM) and labelled slices."""

    image: Path
    labels: Path
    given: tuple[int, ...]  # slices to use as examples (numpy axis 0 = axial)
    truth: np.ndarray  # the full label array

    @property
    def n(self) -> int:
        return self.truth.shape[0]

    @property
    def slices_arg(self) -> str:
        return ",".join(map(str, self.given))


def remap_labels(array: np.ndarray, mapping: dict[int, int] = LABEL_MAP) -> np.ndarray:
    out = np.zeros(array.shape, np.uint8)
    for src, dst in mapping.items():
        out[array == src] = dst
    return out


def sitk_slab(path: Path, lo: int, hi: int) -> sitk.Image:
    """Axial slab [lo, hi) of a file read with SimpleITK (the origin moves with the slab)."""
    return sitk.ReadImage(str(path))[:, :, lo:hi]


def like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A SimpleITK image of `array` on `reference`'s grid."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def write_case(folder: Path, lo: int = SMALL_SLICES[0], hi: int = SMALL_SLICES[1],
               given: tuple[int, ...] = (1, 8)) -> Case:
    """Axial slices [lo, hi) of the MNI152 sample (94 x 77 each, 2 mm) + labels 3/7, as NIfTI."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk_slab(SAMPLE_T1, lo, hi)
    tissue = sitk_slab(SAMPLE_TISSUE, lo, hi)
    truth = remap_labels(sitk.GetArrayFromImage(tissue))
    sitk.WriteImage(image, str(folder / "t1.nii.gz"))
    sitk.WriteImage(like(truth, tissue), str(folder / "labels.nii.gz"))
    return Case(folder / "t1.nii.gz", folder / "labels.nii.gz", given, truth)


def assert_same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-6) -> None:
    """Two images sample the same grid (NIfTI stores geometry as float32, hence a tolerance)."""
    assert a.GetSize() == b.GetSize()
    assert a.GetDimension() == b.GetDimension()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=tol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=tol * 100)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=tol)


def oblique_direction(deg_z: float = 20.0, deg_x: float = 35.0,
                      flips: tuple[float, float, float] = (-1.0, 1.0, -1.0)) -> tuple[float, ...]:
    """A rotation about z then x, with axis flips: far from identity, still orthonormal."""
    tz, tx = np.deg2rad(deg_z), np.deg2rad(deg_x)
    rz = np.array([[np.cos(tz), -np.sin(tz), 0], [np.sin(tz), np.cos(tz), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(tx), -np.sin(tx)], [0, np.sin(tx), np.cos(tx)]])
    return tuple(float(v) for v in (rz @ rx @ np.diag(flips)).ravel())


def files_in(folder: Path) -> list[str]:
    """Everything under a folder (to prove that a failed run left nothing behind)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """The project's one Dice (medgen.metrics), imported lazily: it loads MONAI."""
    from medgen.metrics import dice as metrics_dice

    return metrics_dice(a, b)
