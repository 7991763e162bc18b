"""Training cases from the shared data folder, loaded once into memory.

Every source in ../shared/data is read at run time (never copied into the repository). A `Case` is
one normalised volume (2D images are one-slice volumes) with its labels, modality and the names of
the co-registered contrasts that synthesis episodes pair up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medgen.io.images import read_volume
from medgen.core.intensity import fit_normalizer

DEFAULT_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"


@dataclass
class Case:
    name: str
    image: np.ndarray  # float32 (z, y, x), normalised to about [0, 1]
    spacing: tuple[float, float, float]  # numpy order
    modality: str
    labels: np.ndarray | None = None
    contrasts: dict[str, np.ndarray] = field(default_factory=dict)  # co-registered, normalised
    is_2d: bool = False


def _load(path: Path, modality: str, label_path: Path | None = None, binarize: int | None = None,
          name: str | None = None) -> Case:
    vol = read_volume(path)
    norm = fit_normalizer(vol.array, modality, clip=False)
    labels = None
    if label_path is not None:
        labels = read_volume(label_path, label=True).array
        labels = (labels > binarize).astype(np.uint8) if binarize is not None else labels.astype(np.int32)
    return Case(name or path.stem, norm(vol.array), tuple(reversed(vol.spacing)), modality, labels,
                is_2d=vol.is_2d or vol.shape[0] == 1)


def _brats(folder: Path) -> Case:
    contrasts = {}
    for c in ("t1", "t1c", "t2", "flair"):
        arr = read_volume(folder / f"{c}.nii.gz").array
        contrasts[c] = fit_normalizer(arr, "mr")(arr)
    seg = folder / "seg_fusion_algorithmic.nii.gz"
    labels = read_volume(seg, label=True).array.astype(np.int32) if seg.exists() else None
    return Case(folder.name, contrasts["t1"], (1.0, 1.0, 1.0), "mr", labels, contrasts)


def load_cases(data: Path = DEFAULT_DATA, holdout: tuple[str, ...] = (), busi_limit: int = 200,
               ) -> list[Case]:
    """All training cases except those whose name is in `holdout`."""
    cases: list[Case] = []
    vm = data / "voxelmorph_brain"
    cases.append(_load(vm / "t1.nii.gz", "mr", vm / "aseg.nii.gz", name="voxelmorph"))
    ts = data / "totalseg_example"
    cases.append(_load(ts / "ct.nii.gz", "ct", ts / "ct_seg_model.nii.gz", name="totalseg_ct"))
    cases.append(_load(ts / "mr.nii.gz", "mr", ts / "mr_seg_model.nii.gz", name="totalseg_mr"))
    mni = data / "mni152"
    gm = _load(mni / "t1.nii.gz", "mr", mni / "gm.nii.gz", binarize=127, name="mni_gm")
    gm.labels = gm.labels + 2 * (read_volume(mni / "wm.nii.gz").array > 127) * (gm.labels == 0)
    cases.append(gm)
    pr = data / "pyradiomics"
    for stem, modality in (("brain1", "mr"), ("brain2", "mr"), ("breast1", "mr"), ("lung1", "ct"),
                           ("lung2", "ct")):
        cases.append(_load(pr / f"{stem}_image.nrrd", modality, pr / f"{stem}_label.nrrd", name=stem))
    for sub in sorted((data / "brats").iterdir()):
        if sub.is_dir():
            cases.append(_brats(sub))
    cases.append(_prostate(data / "prostate_t2_dwi"))
    cases += _unlabelled(data)
    cases += _two_d_cases(data, busi_limit)
    return [c for c in cases if c.name not in holdout]


def _prostate(folder: Path) -> Case:
    """T2 and DWI of one subject on different grids: DWI resampled onto T2 (SimpleITK, linear)
    so that synthesis episodes pair the same anatomy in both directions."""
    import SimpleITK as sitk

    t2, dwi = (sitk.ReadImage(str(folder / f"{c}.nii.gz"), sitk.sitkFloat32) for c in ("t2", "dwi"))
    dwi = sitk.Resample(dwi, t2, sitk.Transform(), sitk.sitkLinear, 0.0)
    contrasts = {c: fit_normalizer(a, "mr")(a) for c, a in
                 (("t2", sitk.GetArrayFromImage(t2)), ("dwi", sitk.GetArrayFromImage(dwi)))}
    return Case("prostate", contrasts["t2"], tuple(reversed(t2.GetSpacing())), "mr", None, contrasts)


DICOM_MODALITY = {"CT": "ct", "MR": "mr", "CR": "xray", "DX": "xray", "US": "us"}


def _unlabelled(data: Path) -> list[Case]:
    """Images without labels (denoising, inpainting, supervoxel pseudo-tasks): the dipy T1 slice
    and the grey-level pydicom samples (CT, MR, radiographs, ultrasound)."""
    cases = [_load(data / "dipy_t1" / "t1_coronal_slice.png", "mr", name="dipy_t1")]
    folder = data / "pydicom_samples"
    for entry in json.loads((folder / "index.json").read_text())["files"]:
        modality = DICOM_MODALITY.get(entry.get("modality", ""))
        if modality and entry.get("photometric", "").startswith("MONOCHROME"):
            cases.append(_load(folder / entry["file"], modality, name=f"dicom/{entry['file']}"))
    return cases


def _two_d_cases(data: Path, busi_limit: int) -> list[Case]:
    """BUSI lesions (one image per near-duplicate cluster, normals left out) and DRIVE vessels."""
    cases, clusters = [], set()
    for entry in json.loads((data / "busi" / "index.json").read_text())["cases"]:
        if entry["class"] == "normal" or entry["cluster"] in clusters or len(clusters) >= busi_limit:
            continue
        clusters.add(entry["cluster"])
        cases.append(_load(data / "busi" / entry["image"], "us", data / "busi" / entry["mask"],
                           binarize=0, name=f"busi/{entry['id']}"))
    for p in sorted((data / "drive" / "images").glob("*.png")):
        cases.append(_load(p, "other", data / "drive" / "vessels" / p.name, binarize=0,
                           name=f"drive/{p.stem}"))
    return cases
