"""Reading, writing and geometry: what goes in comes out on exactly the same grid.

A Slicer user's segmentation is useless if it lands a voxel off or flipped, so every path that
writes a volume is checked against SimpleITK's own reading of the input: oblique direction
matrices with flips, anisotropic spacing and a non-zero origin.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medgen_helpers import SAMPLE_T1, assert_same_geometry, oblique_direction, write_case
from medgen import cli
from medgen.io.images import read_volume, write_volume
from medgen.core.volume import Volume, parse_axis

SPACING = (0.7, 1.3, 3.1)
ORIGIN = (-12.5, 40.25, 7.0)


@pytest.fixture
def oblique_t1(sample_t1: Volume) -> Volume:
    """A real block of the MNI152 sample (8 x 40 x 36) on an oblique, flipped, anisotropic grid."""
    block = np.ascontiguousarray(sample_t1.array[36:44, 30:70, 20:56]).astype(np.int16)
    return Volume(block, SPACING, ORIGIN, oblique_direction())


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("flips", [(-1.0, 1.0, -1.0), (1.0, -1.0, 1.0)], ids=["det+1", "det-1"])
def test_round_trip_keeps_array_and_geometry(tmp_path: Path, oblique_t1: Volume, suffix: str, flips) -> None:
    volume = Volume(oblique_t1.array, SPACING, ORIGIN, oblique_direction(flips=flips))
    assert not np.allclose(np.reshape(volume.direction, (3, 3)), np.eye(3))
    path = write_volume(volume, tmp_path / f"oblique{suffix}")
    back = read_volume(path)
    assert back.array.dtype == volume.array.dtype
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.spacing, SPACING, rtol=0, atol=1e-6)
    np.testing.assert_allclose(back.origin, ORIGIN, rtol=0, atol=1e-5)
    np.testing.assert_allclose(back.direction, volume.direction, rtol=0, atol=1e-6)
    assert not back.is_2d
    # and SimpleITK agrees on the world position of a far corner
    image = sitk.ReadImage(str(path))
    corner = tuple(int(s - 1) for s in image.GetSize())
    expected = np.asarray(ORIGIN) + np.reshape(volume.direction, (3, 3)) @ (np.asarray(SPACING) * corner)
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(corner), expected, atol=1e-4)


def test_label_round_trip_keeps_values(tmp_path: Path, oblique_t1: Volume) -> None:
    labels = np.where(oblique_t1.array > np.percentile(oblique_t1.array, 60), 7, 0).astype(np.uint8)
    labels[oblique_t1.array < np.percentile(oblique_t1.array, 20)] = 3
    for suffix in (".nii.gz", ".nrrd", ".seg.nrrd"):
        back = read_volume(write_volume(oblique_t1.with_array(labels), tmp_path / f"lab{suffix}"), label=True)
        np.testing.assert_array_equal(back.array, labels)
        assert set(np.unique(back.array)) == {0, 3, 7}


@pytest.mark.model
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_segment_output_has_input_geometry(tmp_path: Path, small_case, suffix: str) -> None:
    """`medgen run --task segment`: output grid == input grid (oblique), label values 3/7 kept."""
    image = sitk.ReadImage(str(small_case.image))
    labels = sitk.ReadImage(str(small_case.labels))
    for img in (image, labels):
        img.SetSpacing(SPACING)
        img.SetOrigin(ORIGIN)
        img.SetDirection(oblique_direction())
    sitk.WriteImage(image, str(tmp_path / "oblique.nrrd"))
    sitk.WriteImage(labels, str(tmp_path / "oblique_labels.nrrd"))
    out = tmp_path / "out" / f"seg{suffix}"
    out.parent.mkdir()
    code = cli.main(["run", "--task", "segment", "--image", str(tmp_path / "oblique.nrrd"),
                     "--context-target", str(tmp_path / "oblique_labels.nrrd"),
                     "--context-slices", small_case.slices_arg, "--axis", "0",
                     "--out", str(out), "--quiet", "--device", "cpu"])
    assert code == 0
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary left over
    result = sitk.ReadImage(str(out))
    assert_same_geometry(result, sitk.ReadImage(str(tmp_path / "oblique.nrrd")))
    array = sitk.GetArrayFromImage(result)
    assert array.dtype.kind in "ui"
    assert set(np.unique(array)) <= {0, 3, 7}
    assert {3, 7} <= set(np.unique(array))
    for s in small_case.given:  # labelled slices are copied exactly
        np.testing.assert_array_equal(array[s], small_case.truth[s])


def _world_axis_of_numpy_axis(image: sitk.Image, axis: int) -> int:
    """Independent of parse_axis: step one voxel along numpy `axis`, see which world axis moves."""
    index = [0, 0, 0]
    index[2 - axis] = 1
    step = np.subtract(image.TransformIndexToPhysicalPoint(index), image.TransformIndexToPhysicalPoint((0, 0, 0)))
    return int(np.argmax(np.abs(step)))


WORLD = {"sagittal": 0, "coronal": 1, "axial": 2}  # LPS: x (left), y (posterior), z (superior)


def test_parse_axis_names_on_sagittal_acquisition(tmp_path: Path, sample_t1: Volume) -> None:
    """A volume stored sagittal-first: index i -> P, j -> S, k -> L (numpy axis 0 = sagittal)."""
    direction = (0.0, 0.0, -1.0,
                 1.0, 0.0, 0.0,
                 0.0, 1.0, 0.0)
    block = np.ascontiguousarray(sample_t1.array[30:50, 20:60, 10:70])
    path = write_volume(Volume(block, (1.0, 1.2, 3.0), ORIGIN, direction), tmp_path / "sag.nii.gz")
    volume = read_volume(path)
    image = sitk.ReadImage(str(path))
    assert parse_axis("sagittal", volume) == 0
    assert parse_axis("axial", volume) == 1
    assert parse_axis("coronal", volume) == 2
    assert parse_axis(None, volume) == 1  # default: axial
    for name, world in WORLD.items():
        assert _world_axis_of_numpy_axis(image, parse_axis(name, volume)) == world
    assert parse_axis("2", volume) == 2 and parse_axis(1, volume) == 1


def test_parse_axis_names_on_real_lia_volume(shared_data: Path) -> None:
    """voxelmorph_brain is stored in FreeSurfer's LIA order: axial is numpy axis 1 there."""
    path = shared_data / "voxelmorph_brain" / "t1.nii.gz"
    volume, image = read_volume(path), sitk.ReadImage(str(path))
    assert parse_axis("axial", volume) == 1
    assert parse_axis("coronal", volume) == 0
    assert parse_axis("sagittal", volume) == 2
    for name, world in WORLD.items():
        assert _world_axis_of_numpy_axis(image, parse_axis(name, volume)) == world


def test_parse_axis_names_on_the_sample(sample_t1: Volume) -> None:
    image = sitk.ReadImage(str(SAMPLE_T1))
    for name, world in WORLD.items():
        assert _world_axis_of_numpy_axis(image, parse_axis(name, sample_t1)) == world
    assert parse_axis("axial", sample_t1) == 0


def test_png_round_trip(tmp_path: Path, shared_data: Path) -> None:
    src = shared_data / "busi" / "images" / "benign_001.png"
    volume = read_volume(src)
    assert volume.is_2d and volume.shape == (1, 215, 256)
    out = write_volume(volume, tmp_path / "copy.png")
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert back.shape == (215, 256) and back.dtype == np.uint8
    np.testing.assert_array_equal(back, sitk.GetArrayFromImage(sitk.ReadImage(str(src))))


def test_colour_png_becomes_grey(tmp_path: Path, shared_data: Path) -> None:
    rgb = sitk.ReadImage(str(shared_data / "drive" / "images" / "21.png"))
    sitk.WriteImage(rgb[200:300, 250:330], str(tmp_path / "crop.png"))
    volume = read_volume(tmp_path / "crop.png")
    assert volume.is_2d and volume.shape == (1, 80, 100)  # sitk [x, y] slicing: 100 columns, 80 rows
    rgb_array = sitk.GetArrayFromImage(rgb[200:300, 250:330]).astype(np.float64)
    luminance = rgb_array @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(volume.array[0], luminance, atol=1e-3)


def test_png_segmentation_in_png_out_same_size(tmp_path: Path, shared_data: Path) -> None:
    """2D PNG query + one 2D PNG example pair -> a PNG label image of the query's size."""
    busi = shared_data / "busi"
    mask = sitk.ReadImage(str(busi / "masks" / "benign_003.png"))
    sitk.WriteImage(sitk.Cast(mask, sitk.sitkUInt8) * 9, str(tmp_path / "ctx_mask.png"))
    out = tmp_path / "out" / "seg.png"
    out.parent.mkdir()
    code = cli.main(["run", "--task", "segment", "--image", str(busi / "images" / "benign_001.png"),
                     "--context-image", str(busi / "images" / "benign_003.png"),
                     "--context-target", str(tmp_path / "ctx_mask.png"),
                     "--out", str(out), "--quiet", "--device", "cpu"])
    assert code == 0
    result = sitk.ReadImage(str(out))
    assert result.GetDimension() == 2 and result.GetSize() == (256, 215)
    array = sitk.GetArrayFromImage(result)
    assert array.dtype == np.uint8 and set(np.unique(array)) <= {0, 9}


def test_dicom_single_file(shared_data: Path) -> None:
    path = shared_data / "pydicom_samples" / "CT_small.dcm"
    volume = read_volume(path)
    image = sitk.ReadImage(str(path))
    assert volume.shape == (1, 128, 128)
    assert volume.array.dtype.kind in "iu"
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(volume.spacing, image.GetSpacing())
    np.testing.assert_allclose(volume.origin, image.GetOrigin())
    assert volume.array.min() < -500 and volume.array.max() > 100  # Hounsfield units
    from medgen.core.intensity import guess_modality
    assert guess_modality(volume.array) == "ct"


def test_write_refuses_unknown_extension(tmp_path: Path, sample_t1: Volume) -> None:
    from medgen.core.errors import InputError
    with pytest.raises(InputError, match="cannot write"):
        write_volume(sample_t1, tmp_path / "x.xyz")
    assert not (tmp_path / "x.xyz").exists()


def test_png_output_of_a_3d_volume_is_refused(tmp_path: Path, capsys) -> None:
    case = write_case(tmp_path / "case", 38, 42, given=(0, 3))
    out = tmp_path / "out" / "seg.png"
    out.parent.mkdir()
    code = cli.main(["run", "--task", "segment", "--image", str(case.image),
                     "--context-target", str(case.labels), "--context-slices", case.slices_arg,
                     "--out", str(out), "--quiet", "--device", "cpu"])
    assert code != 0 and not out.exists()


@pytest.mark.parametrize("shape,out,aa", [((300, 260), (128, 128), True), ((97, 131), (128, 128), False),
                                          ((128, 128), (57, 61), False), ((200, 100), (128, 128), True)])
def test_grid_resize_equals_monai_resize(sample_t1: Volume, shape, out, aa: bool) -> None:
    """The crop-to-grid resampler skips MONAI's bookkeeping but must keep its arithmetic exactly
    (the model was trained on MONAI's Resize), on a real slice resampled to odd shapes."""
    from monai.transforms import Resize

    from medgen.core.grid import resize

    mid = sample_t1.array[sample_t1.array.shape[0] // 2].astype(np.float32)
    patch = np.asarray(Resize(shape, mode="bilinear")(mid[None]))[0]
    expected = np.asarray(Resize(out, mode="bilinear", anti_aliasing=aa)(patch[None]))[0]
    np.testing.assert_array_equal(resize(patch, out, anti_aliasing=aa), expected)
