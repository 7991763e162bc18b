"""Reading and writing images through SimpleITK, with the checks that protect the model.

Every reader returns a `Volume` (see volume.py). Checks happen here, once, so that the engine can
trust its inputs: 4D data, complex or unsupported pixel types and NaN/Inf voxels are refused with a
message that says what to do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medgen.core.errors import InputError
from medgen.core.volume import Volume

TWO_D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
WRITE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".seg.nrrd", ".mha", ".mhd", ".png")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".nii.gz", ".seg.nrrd"):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _read_sitk(path: Path) -> sitk.Image:
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            files = reader.GetGDCMSeriesFileNames(str(path))
            if not files:
                raise InputError(f"{path}: folder holds no DICOM series")
            reader.SetFileNames(files)
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise InputError(f"{path}: cannot read image ({str(err).strip().splitlines()[-1]})") from err


def read_volume(path: str | Path, label: bool = False) -> Volume:
    """Read a 2D image or 3D volume; colour images become grey (labels keep their first channel)."""
    path = Path(path)
    image = _read_sitk(path)
    if image.GetNumberOfComponentsPerPixel() > 1:
        image = _to_grey(image, label)
    if image.GetDimension() == 4 or (image.GetDimension() == 3 and 1 not in image.GetSize()
                                     and _suffix(path) in TWO_D_SUFFIXES):
        raise InputError(f"{path}: {image.GetDimension()}D image of size {image.GetSize()} is not "
                         "supported: give a 3D volume or a 2D image (split 4D series first)")
    if image.GetDimension() > 4:
        raise InputError(f"{path}: {image.GetDimension()}D images are not supported")
    array = sitk.GetArrayFromImage(image)
    _check_pixels(path, array)
    if image.GetDimension() == 2 or (image.GetDimension() == 3 and image.GetSize()[2] == 1
                                     and _suffix(path) in TWO_D_SUFFIXES):
        return _two_d(image, array)
    return Volume(array=array, spacing=image.GetSpacing(), origin=image.GetOrigin(),
                  direction=image.GetDirection())


def _to_grey(image: sitk.Image, label: bool) -> sitk.Image:
    """Colour to luminance for images; a colour label image keeps its first channel."""
    channels = [sitk.VectorIndexSelectionCast(image, c, sitk.sitkFloat32)
                for c in range(image.GetNumberOfComponentsPerPixel())]
    if label or len(channels) < 3:
        return sitk.Cast(channels[0], sitk.sitkUInt16) if label else channels[0]
    return channels[0] * 0.299 + channels[1] * 0.587 + channels[2] * 0.114


def _two_d(image: sitk.Image, array: np.ndarray) -> Volume:
    spacing, origin = image.GetSpacing(), image.GetOrigin()
    return Volume(array=array.reshape((1,) + array.shape[-2:]), spacing=(spacing[0], spacing[1], 1.0),
                  origin=(origin[0], origin[1], 0.0), is_2d=True)


def _check_pixels(path: Path, array: np.ndarray) -> None:
    if array.dtype.kind not in "biuf":
        raise InputError(f"{path}: pixel type {array.dtype} is not supported: convert to an integer "
                         "or float image")
    if array.ndim == 4:
        raise InputError(f"{path}: 4D image of shape {array.shape} is not supported: give a 3D volume")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InputError(f"{path}: {bad} voxels are NaN or Inf: replace them (e.g. with 0) first")


def to_sitk(volume: Volume, array: np.ndarray | None = None) -> sitk.Image:
    """A SimpleITK image of `array` (default: the volume's own) on the volume's exact grid."""
    array = volume.array if array is None else array
    if volume.is_2d:
        image = sitk.GetImageFromArray(array.reshape(array.shape[-2:]))
        image.SetSpacing(volume.spacing[:2])
        image.SetOrigin(volume.origin[:2])
        return image
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction)
    return image


def write_volume(volume: Volume, path: str | Path, array: np.ndarray | None = None) -> Path:
    """Write on the volume's grid; format from the extension. PNG keeps 8 bits when it fits."""
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in WRITE_SUFFIXES:
        raise InputError(f"{path}: cannot write {suffix or 'files without extension'}: "
                         f"use one of {', '.join(WRITE_SUFFIXES)}")
    array = volume.array if array is None else array
    if suffix == ".png":
        array = _png_array(array)
    image = to_sitk(volume, array)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=suffix != ".png")
    return path


def _png_array(array: np.ndarray) -> np.ndarray:
    rounded = np.rint(array)
    if rounded.min() >= 0 and rounded.max() <= 255:
        return rounded.astype(np.uint8)
    if rounded.min() >= 0 and rounded.max() <= 65535:
        return rounded.astype(np.uint16)
    raise InputError("values outside 0..65535 cannot be written as PNG: use .nii.gz or .nrrd")


def check_writable(path: str | Path) -> Path:
    """Fail before the work, not after it, when the output cannot be written."""
    path = Path(path)
    if _suffix(path) not in WRITE_SUFFIXES:
        raise InputError(f"{path}: unsupported output extension: use one of {', '.join(WRITE_SUFFIXES)}")
    if not path.parent.exists() and path.parent != Path(""):
        raise InputError(f"{path}: output folder {path.parent} does not exist")
    return path
