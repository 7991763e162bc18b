"""Reading and writing images through SimpleITK, with the checks that protect the model.

Every reader returns a `Volume` (see volume.py). Checks happen here, once, so that the engine can
trust its inputs: 4D data, complex or unsupported pixel types, truncated files, NaN/Inf voxels,
label values the engine cannot hold and folders of several DICOM series are refused with a message
that says what to do. Writers never leave a partial output: every file of the format is written
under a temporary name in the output's folder and renamed only after all were written.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from medgen.core.errors import InputError
from medgen.core.volume import Volume
from medgen.io import nifti

TWO_D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
WRITE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".seg.nrrd", ".mha", ".mhd", ".png")
LABEL_MAX = 2**31 - 1  # labels become int32 outputs (segment.label_dtype): larger ones would wrap
# zlib cannot compress better than about 1032:1, so a single-file image whose header claims more
# voxel bytes than this times its size is truncated or corrupt; refused before ITK allocates.
MAX_RATIO = 1100
SINGLE_FILE = (".nii", ".nii.gz", ".nrrd", ".seg.nrrd", ".mha")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".nii.gz", ".seg.nrrd"):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


class _Said:
    """What the native libraries printed inside `quiet_native` (filled when the block ends)."""

    text = ""


@contextmanager
def quiet_native() -> Iterator[_Said]:
    """Capture what ITK, GDCM and MetaIO print on the process's stdout/stderr.

    They write from C++ (std::cerr), out of Python's reach; a refusal must be one line, and their
    text is kept to explain a failure. Without usable file descriptors (some GUIs) nothing is
    captured.
    """
    said = _Said()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = (os.dup(1), os.dup(2))
    except (OSError, ValueError, AttributeError):
        yield said
        return
    sink = tempfile.TemporaryFile()
    try:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        yield said
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        sink.seek(0)
        said.text = sink.read().decode("utf-8", "replace")
        sink.close()


def _native_reason(err: Exception, captured: str) -> str:
    """The most telling line of what ITK said: its exception, else what it printed."""
    lines = [ln.strip() for ln in (str(err).strip().splitlines() + captured.splitlines()) if ln.strip()]
    useful = [ln for ln in lines if "No such file" not in ln and not ln.startswith(("Reason", "itk::"))]
    for i, line in enumerate(useful[:-1]):
        if "not read completely" in line:  # MetaIO: the next line says how much
            return f"the file is truncated: {line.split(':')[-1].strip()}, {useful[i + 1]}"[:200]
    return (useful or lines or ["unknown error"])[-1][:200]


def _read_sitk(path: Path) -> sitk.Image:
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        return _read_dicom_folder(path)
    if _suffix(path) in (".nii", ".nii.gz"):
        nifti.check_payload(path)  # ITK zero-fills truncated NIfTI and reads its NaN as 0
    if _suffix(path) in SINGLE_FILE:
        _check_claimed_size(path)
    error: Exception | None = None
    with quiet_native() as said:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as err:
            error = err
    if error is None and _native_failure(said.text):  # MetaIO: "Uncompress failed", no exception
        error = RuntimeError(_native_failure(said.text))
    if error is not None:
        raise InputError(f"{path}: cannot read image ({_native_reason(error, said.text)})") from error
    return image


def _native_failure(text: str) -> str:
    """A failure a native reader printed but did not raise (it then returns garbage voxels)."""
    bad = [ln.strip() for ln in text.splitlines()
           if ("fail" in ln.lower() or "error" in ln.lower() or "not read completely" in ln)
           and "warning" not in ln.lower()]
    return bad[0] if bad else ""


def _check_claimed_size(path: Path) -> None:
    """Refuse a header that claims more voxels than the file can hold, before allocating them."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with quiet_native() as said:
        try:
            reader.ReadImageInformation()
            error = None
        except RuntimeError as err:
            error = err
    if error is not None:
        raise InputError(f"{path}: cannot read image ({_native_reason(error, said.text)})") from error
    component = sitk.Image([1, 1], reader.GetPixelID(), 1).GetSizeOfPixelComponent()
    claimed = int(np.prod(reader.GetSize(), dtype=object)) * reader.GetNumberOfComponents() * component
    if claimed > path.stat().st_size * MAX_RATIO + (1 << 20):
        raise InputError(f"{path}: the header describes {claimed} bytes of voxels, more than a file of "
                         f"{path.stat().st_size} bytes can hold: the file is truncated or corrupt; "
                         "copy or export it again")


def _read_dicom_folder(path: Path) -> sitk.Image:
    """One DICOM series per folder: several would be mixed up or one silently chosen."""
    with quiet_native():
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise InputError(f"{path}: folder holds no DICOM series: give the folder of one DICOM series "
                         "or an image file")
    if len(series) > 1:
        listed = "; ".join(f"{uid} ({len(_series_files(path, uid))} files)" for uid in series[:6])
        raise InputError(f"{path}: folder holds {len(series)} DICOM series ({listed}): copy the series "
                         "to use into a folder of its own")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(_series_files(path, series[0]))
    with quiet_native() as said:
        try:
            return reader.Execute()
        except RuntimeError as err:
            error = err
    raise InputError(f"{path}: cannot read the DICOM series ({_native_reason(error, said.text)})") from error


def _series_files(path: Path, uid: str) -> tuple[str, ...]:
    with quiet_native():
        return sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), uid)


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
    if label:
        _check_labels(path, array)
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
    """A one-slice volume; a 2D direction (e.g. a mirrored NIfTI) is kept in the upper-left 2x2."""
    spacing, origin = image.GetSpacing(), image.GetOrigin()
    d = image.GetDirection()
    direction = (d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0) if len(d) == 4 else (1, 0, 0, 0, 1, 0, 0, 0, 1)
    return Volume(array=array.reshape((1,) + array.shape[-2:]), spacing=(spacing[0], spacing[1], 1.0),
                  origin=(origin[0], origin[1], 0.0), direction=direction, is_2d=True)


def _check_pixels(path: Path, array: np.ndarray) -> None:
    if array.dtype.kind not in "biuf":
        raise InputError(f"{path}: pixel type {array.dtype} is not supported: convert to an integer "
                         "or float image")
    if array.ndim == 4:
        raise InputError(f"{path}: 4D image of shape {array.shape} is not supported: give a 3D volume")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InputError(f"{path}: {bad} voxels are NaN or Inf: replace them (e.g. with 0) first")


def _check_labels(path: Path, array: np.ndarray) -> None:
    """Label values must fit the int32 output exactly (larger ones would wrap to other labels)."""
    if array.size and array.dtype.itemsize >= 4 and (array.max() > LABEL_MAX or array.min() < -LABEL_MAX):
        raise InputError(f"{path}: label value {array.max() if array.max() > LABEL_MAX else array.min()} "
                         f"is beyond what a label image can hold here (0..{LABEL_MAX}): renumber the "
                         "labels 1, 2, 3, ...")


def to_sitk(volume: Volume, array: np.ndarray | None = None) -> sitk.Image:
    """A SimpleITK image of `array` (default: the volume's own) on the volume's exact grid."""
    array = volume.array if array is None else array
    if volume.is_2d:
        image = sitk.GetImageFromArray(array.reshape(array.shape[-2:]))
        image.SetSpacing(volume.spacing[:2])
        image.SetOrigin(volume.origin[:2])
        d = volume.direction
        image.SetDirection((d[0], d[1], d[3], d[4]))
        return image
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction)
    return image


def write_volume(volume: Volume, path: str | Path, array: np.ndarray | None = None,
                 compress: bool = True) -> Path:
    """Write on the volume's grid; format from the extension. PNG keeps 8 bits when it fits.
    compress=False for scratch files (the worker's job folder), where gzip costs more than it saves.

    All files of the format (.mhd + .zraw) are written with their final names inside a temporary
    folder beside the output, then renamed into place data first, header last: a crash or a full
    disk never leaves a header without its data, nor a half-written file under the output's name.
    """
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
    tmp = Path(tempfile.mkdtemp(prefix=".medgen-", dir=path.parent))
    try:
        error = None
        with quiet_native() as said:
            try:
                sitk.WriteImage(image, str(tmp / path.name), useCompression=compress and suffix != ".png")
            except RuntimeError as err:
                error = err
        if error is not None:
            raise InputError(f"{path}: cannot write ({_native_reason(error, said.text)})") from error
        written = sorted(tmp.iterdir(), key=lambda p: p.name == path.name)  # header (our name) last
        for part in written:
            os.replace(part, path.parent / part.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _png_array(array: np.ndarray) -> np.ndarray:
    rounded = np.rint(array)
    if rounded.min() >= 0 and rounded.max() <= 255:
        return rounded.astype(np.uint8)
    if rounded.min() >= 0 and rounded.max() <= 65535:
        return rounded.astype(np.uint16)
    raise InputError("values outside 0..65535 cannot be written as PNG: use .nii.gz or .nrrd")


def check_writable(path: str | Path) -> Path:
    """Fail before the work, not after it, when the output cannot be written.

    The folder is probed by creating (and removing) a file in it: permission bits say nothing
    for root or on a read-only file system.
    """
    path = Path(path)
    if _suffix(path) not in WRITE_SUFFIXES:
        raise InputError(f"{path}: unsupported output extension: use one of {', '.join(WRITE_SUFFIXES)}")
    if path.is_dir():
        raise InputError(f"{path}: is an existing folder: give a file name for the output")
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"{path}: output folder {folder} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=".medgen-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise InputError(f"{path}: cannot write in {folder} ({err.strerror}): choose a writable "
                         "folder") from err
    return path


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when two paths name one file (also through symlinks, hard links or `..`)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()
