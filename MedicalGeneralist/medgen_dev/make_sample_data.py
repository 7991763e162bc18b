"""Rebuild the demo volume from the MNI152 template that the nilearn wheel ships.

Run once by a maintainer (not at install or test time):
    pip download --no-deps nilearn==0.14.1 -d /tmp/nl && python make_sample_data.py /tmp/nl/nilearn-0.14.1-py3-none-any.whl
It writes mni152_t1_2mm.nii.gz (T1, 2 mm, cropped to the head) and mni152_tissue_2mm.nii.gz
(1 = grey matter, 2 = white matter: the template's probability maps above 0.5). SimpleITK does the
resampling (linear for the T1, linear-then-threshold for the probability maps).
"""

from __future__ import annotations

import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

STEM = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
HERE = Path(__file__).resolve().parents[1] / "medgen" / "resources" / "SampleData"


def resample(image: sitk.Image, spacing: float) -> sitk.Image:
    size = [int(round(s * sp / spacing)) for s, sp in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                         (spacing,) * 3, image.GetDirection(), 0.0, sitk.sitkFloat32)


def main(wheel: str) -> None:
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as z:
        images = {}
        for name in ("t1", "gm", "wm"):
            path = Path(tmp) / f"{name}.nii.gz"
            path.write_bytes(z.read(STEM.format(name)))
            images[name] = resample(sitk.ReadImage(str(path)), 2.0)
    t1 = sitk.GetArrayFromImage(images["t1"])
    gm, wm = (sitk.GetArrayFromImage(images[n]) > 127 for n in ("gm", "wm"))
    tissue = np.where(wm, 2, np.where(gm, 1, 0)).astype(np.uint8)
    head = np.argwhere(t1 > 5)
    lo, hi = np.maximum(head.min(0) - 2, 0), np.minimum(head.max(0) + 3, t1.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    origin = images["t1"].TransformIndexToPhysicalPoint([int(v) for v in lo[::-1]])
    for array, name, dtype in ((t1, "t1", np.uint8), (tissue, "tissue", np.uint8)):
        out = sitk.GetImageFromArray(np.clip(np.rint(array[crop]), 0, 255).astype(dtype))
        out.SetSpacing((2.0,) * 3)
        out.SetOrigin(origin)
        out.SetDirection(images["t1"].GetDirection())
        sitk.WriteImage(out, str(HERE / f"mni152_{name}_2mm.nii.gz"), useCompression=True)


if __name__ == "__main__":
    main(sys.argv[1])
