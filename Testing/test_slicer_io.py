"""slicer_io on real MRML (slicer-core): geometry, slice views, segments, examples, result nodes."""

from __future__ import annotations

import numpy as np
import pytest

from test_slicer_scene import T1, TISSUE, Scene, mrml, oblique_ijk_to_ras, slicer, vtk, vtk_image_bytes  # noqa: F401

from MedicalGeneralistLib import slicer_io as io  # noqa: E402
from medgen.core.errors import InputError  # noqa: E402
from medgen.io.images import read_volume, write_volume  # noqa: E402
from medgen.core.volume import Volume  # noqa: E402


def _save(mrml: Scene, node, path) -> None:
    storage = mrml.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.WriteData(node)
    mrml.scene.RemoveNode(storage)


def _oblique_volume(mrml: Scene, name: str = "oblique"):
    array = np.random.default_rng(0).normal(100, 20, (12, 15, 18)).astype(np.float32)
    return mrml.add_volume(array, oblique_ijk_to_ras(), name)


# -- volumes -----------------------------------------------------------------------------------
def test_volume_matches_what_slicer_writes_to_disk(mrml: Scene, tmp_path) -> None:
    """node -> Volume gives exactly the LPS geometry SimpleITK reads from Slicer's own file."""
    node = _oblique_volume(mrml)
    _save(mrml, node, tmp_path / "v.nrrd")
    ours, theirs = io.node_to_volume(node), read_volume(tmp_path / "v.nrrd")
    np.testing.assert_array_equal(ours.array, theirs.array)
    np.testing.assert_allclose(ours.spacing, theirs.spacing, atol=1e-6)
    np.testing.assert_allclose(ours.origin, theirs.origin, atol=1e-5)
    np.testing.assert_allclose(ours.direction, theirs.direction, atol=1e-6)
    assert not ours.is_2d


def test_volume_round_trip_through_a_new_node(mrml: Scene, tmp_path) -> None:
    """Volume -> node -> file -> Volume reproduces geometry and voxels (engine output path)."""
    volume = io.node_to_volume(_oblique_volume(mrml))
    node = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "back")
    io.set_volume_geometry(node, volume)
    slicer.util.updateVolumeFromArray(node, volume.array)
    np.testing.assert_allclose(io.ijk_to_ras(node), oblique_ijk_to_ras(), atol=1e-6)
    _save(mrml, node, tmp_path / "back.nrrd")
    again = read_volume(tmp_path / "back.nrrd")
    assert again.same_grid(volume)
    write_volume(volume, tmp_path / "engine.nii.gz")  # the engine's writer agrees with Slicer's reader
    loaded = mrml.load_volume(tmp_path / "engine.nii.gz", "engine")
    np.testing.assert_allclose(io.ijk_to_ras(loaded), oblique_ijk_to_ras(), atol=1e-4)


def test_sample_read_by_slicer_equals_sample_read_by_engine(mrml: Scene) -> None:
    ours, theirs = io.node_to_volume(mrml.load_volume(T1, "t1")), read_volume(T1)
    np.testing.assert_array_equal(ours.array, theirs.array)
    assert ours.same_grid(theirs)


def test_bad_volumes_are_refused_by_name(mrml: Scene) -> None:
    with pytest.raises(InputError, match="no input volume"):
        io.node_to_volume(None, "input volume")
    empty = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty one")
    with pytest.raises(InputError, match="'empty one' holds no voxels"):
        io.node_to_volume(empty)
    bad = mrml.add_volume(np.full((2, 3, 4), np.nan, np.float32), name="nans")
    with pytest.raises(InputError, match="NaN"):
        io.node_to_volume(bad)


# -- slice views -------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_each_axis_of_an_oblique_volume_from_its_view(mrml: Scene, axis: int) -> None:
    """A view aligned with the volume (as 'Rotate to volume plane' does) maps to axis and index."""
    node = _oblique_volume(mrml)
    view = mrml.slice_node("Yellow")
    index = [7, 9, 11][axis]
    io.show_slice(view, node, axis, index)
    assert io.slice_axis_index(view, node) == (axis, index)
    assert io.find_slice_node(mrml.scene, "Yellow") is view


@pytest.mark.parametrize("orientation, axis", [("Axial", 0), ("Coronal", 1), ("Sagittal", 2)])
def test_slicer_presets_and_rotate_to_volume_plane(mrml: Scene, orientation: str, axis: int) -> None:
    """Slicer's own view orientation presets give the expected numpy axis on the sample."""
    node = mrml.load_volume(T1, "t1")
    view = mrml.slice_node("Red")
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(mrml.scene)
    assert view.SetOrientation(orientation)
    view.RotateToVolumePlane(node)
    ijk = [30, 40, 50]  # i, j, k; numpy axis a is index axis 2 - a
    view.JumpSliceByCentering(*(io.ijk_to_ras(node) @ [*ijk, 1])[:3])
    assert io.slice_axis_index(view, node) == (axis, ijk[2 - axis])


def test_permuted_volume_axes_follow_the_view(mrml: Scene) -> None:
    """A sagittally acquired volume (k runs left-right): the axial view is not numpy axis 0."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]]) * 1.5  # i->A, j->S, k->R
    node = mrml.add_volume(np.zeros((10, 11, 12), np.int16), matrix, "sagittal scan")
    view = mrml.slice_node("Red")
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(mrml.scene)
    view.SetOrientation("Axial")
    view.JumpSliceByCentering(*(matrix @ [3, 4, 5, 1])[:3])
    assert io.slice_axis_index(view, node) == (1, 4)  # axial = along j = numpy axis 1


def test_oblique_view_is_refused_with_the_fix(mrml: Scene) -> None:
    node = _oblique_volume(mrml)
    view = mrml.slice_node("Green")
    io.show_slice(view, node, 1, 5)
    view.GetSliceToRAS().DeepCopy(slicer.util.vtkMatrixFromArray(
        _rotated(slicer.util.arrayFromVTKMatrix(view.GetSliceToRAS()), 10.0)))
    view.UpdateMatrices()
    with pytest.raises(InputError, match=r"Green view is oblique.*10\.0 degrees.*Rotate to volume plane"):
        io.slice_axis_index(view, node)


def test_view_outside_the_volume_is_refused(mrml: Scene) -> None:
    node = _oblique_volume(mrml)
    view = mrml.slice_node("Red")
    io.show_slice(view, node, 0, 3)
    matrix = slicer.util.arrayFromVTKMatrix(view.GetSliceToRAS())
    matrix[:3, 3] += 100 * matrix[:3, 2]
    view.GetSliceToRAS().DeepCopy(slicer.util.vtkMatrixFromArray(matrix))
    with pytest.raises(InputError, match="outside volume 'oblique'"):
        io.slice_axis_index(view, node)
    with pytest.raises(InputError, match="no Purple slice view"):
        io.find_slice_node(mrml.scene, "Purple")


def test_linear_parent_transform_is_followed(mrml: Scene) -> None:
    node = _oblique_volume(mrml)
    transform = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = [40.0, -25.0, 10.0]
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    node.SetAndObserveTransformNodeID(transform.GetID())
    view = mrml.slice_node("Red")
    io.show_slice(view, node, 2, 8)
    assert io.slice_axis_index(view, node) == (2, 8)
    assert np.allclose(slicer.util.arrayFromVTKMatrix(view.GetSliceToRAS())[:3, 3],
                       (shift @ io.ijk_to_ras(node) @ [8, 7, 5.5, 1])[:3])


def test_segments_under_the_volume_transform_round_trip(mrml: Scene) -> None:
    """Volume and result under the same parent transform: masks stay on the volume's voxels."""
    node = _oblique_volume(mrml)
    transform = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    turn = _rotated(np.eye(4), 30.0)
    turn[:3, 3] = [10.0, 20.0, -5.0]
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(turn))
    node.SetAndObserveTransformNodeID(transform.GetID())
    seg = io.new_segmentation_node(node, "moved")
    assert seg.GetTransformNodeID() == transform.GetID()
    a, b = _overlapping_masks((12, 15, 18))
    io.add_segments(seg, node, [("organ", None, a), ("lesion", None, b)])
    masks = io.segment_masks(seg, ["organ", "lesion"], node)
    np.testing.assert_array_equal(masks["organ"], a)
    np.testing.assert_array_equal(masks["lesion"], b)


def _rotated(matrix: np.ndarray, degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    turn = np.eye(4)
    turn[:3, :3] = [[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]]
    return matrix @ turn


# -- segments ----------------------------------------------------------------------------------
def _overlapping_masks(shape):
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    a[2:8, 3:10, 4:12] = True
    b[5:11, 6:13, 8:16] = True
    return a, b


def test_segmentation_round_trip_keeps_overlaps(mrml: Scene) -> None:
    node = _oblique_volume(mrml)
    seg = io.new_segmentation_node(node, "result")
    a, b = _overlapping_masks((12, 15, 18))
    ids = io.add_segments(seg, node, [("organ", (1.0, 0.0, 0.0), a), ("lesion", (0.0, 1.0, 0.0), b)])
    masks = io.segment_masks(seg, ["organ", "lesion"], node)
    np.testing.assert_array_equal(masks["organ"], a)
    np.testing.assert_array_equal(masks["lesion"], b)
    assert (masks["organ"] & masks["lesion"]).any()
    assert io.segment_names(seg) == ["organ", "lesion"] and len(ids) == 2
    assert io.segment_color(seg, "lesion") == pytest.approx((0.0, 1.0, 0.0))


def test_seg_nrrd_save_and_load_keeps_overlapping_segments(mrml: Scene, tmp_path) -> None:
    node = _oblique_volume(mrml)
    seg = io.new_segmentation_node(node, "result")
    a, b = _overlapping_masks((12, 15, 18))
    io.add_segments(seg, node, [("organ", (1.0, 0.0, 0.0), a), ("lesion", (0.0, 1.0, 0.0), b)])
    storage = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "result.seg.nrrd"))
    assert storage.WriteData(seg)
    loaded = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    reader = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(tmp_path / "result.seg.nrrd"))
    assert reader.ReadData(loaded)
    assert io.segment_names(loaded) == ["organ", "lesion"]
    masks = io.segment_masks(loaded, ["organ", "lesion"], node)
    np.testing.assert_array_equal(masks["organ"], a)
    np.testing.assert_array_equal(masks["lesion"], b)


def test_adding_segments_never_touches_existing_ones(mrml: Scene) -> None:
    node = _oblique_volume(mrml)
    seg = io.new_segmentation_node(node, "user's work")
    a, b = _overlapping_masks((12, 15, 18))
    io.add_segments(seg, node, [("organ", (1.0, 0.0, 0.0), a), ("vessel", (0.0, 0.0, 1.0), ~a & ~b)])
    segmentation = seg.GetSegmentation()
    before = {sid: (segmentation.GetSegment(sid).GetName(), tuple(segmentation.GetSegment(sid).GetColor()),
                    vtk_image_bytes(segmentation.GetSegment(sid).GetRepresentation("Binary labelmap")))
              for sid in (segmentation.GetNthSegmentID(i) for i in range(2))}
    arrays = {sid: slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, node) for sid in before}
    new = io.add_segments(seg, node, [("organ", (0.5, 0.5, 0.0), b), ("organ", None, a | b), ("empty", None, a & False)])
    after = {sid: (segmentation.GetSegment(sid).GetName(), tuple(segmentation.GetSegment(sid).GetColor()),
                   vtk_image_bytes(segmentation.GetSegment(sid).GetRepresentation("Binary labelmap")))
             for sid in before}
    assert after == before  # names, colours and the stored labelmap bytes
    for sid, array in arrays.items():
        np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, node), array)
    assert io.segment_names(seg) == ["organ", "vessel", "organ (2)", "organ (3)", "empty"]
    np.testing.assert_array_equal(io.segment_masks(seg, ["organ (2)"], node)["organ (2)"], b)
    assert len(new) == 3


def test_missing_segment_is_named(mrml: Scene) -> None:
    node = _oblique_volume(mrml)
    seg = io.new_segmentation_node(node, "labels")
    with pytest.raises(InputError, match="'labels' has no segment named 'liver'"):
        io.segment_masks(seg, ["liver"], node)


def test_overlap_free_groups() -> None:
    a, b = _overlapping_masks((12, 15, 18))
    c = np.zeros_like(a)
    c[0, 0, 0] = True
    slices = [{"a": a[5], "b": b[5], "c": c[5]}, {"a": a[0], "b": b[0], "c": c[0]}]
    assert io.overlap_free_groups(["a", "b", "c"], slices) == [["a", "c"], ["b"]]


# -- examples ----------------------------------------------------------------------------------
def _other_patient(mrml: Scene, t1):
    """A second 'patient': the template shifted by 3 voxels on a permuted, shifted grid."""
    array = np.roll(slicer.util.arrayFromVolume(t1), 3, axis=1).copy()
    ijk = io.ijk_to_ras(t1)
    ijk[:3, 3] += [5.0, -7.0, 11.0]
    other = mrml.add_volume(array, ijk, "other patient")
    seg = mrml.tissue_segmentation(t1, "other tissue")  # same labels, moved with the image
    labels = np.roll(slicer.util.arrayFromSegmentBinaryLabelmap(seg, seg.GetSegmentation().GetNthSegmentID(0), t1), 3, axis=1)
    other_seg = io.new_segmentation_node(other, "other labels")
    io.add_segments(other_seg, other, [("grey matter", (1.0, 1.0, 0.0), labels != 0)])
    mrml.scene.RemoveNode(seg)
    return other, other_seg


def test_examples_from_the_input_and_a_second_volume(mrml: Scene) -> None:
    t1 = mrml.load_volume(T1, "t1")
    seg = mrml.tissue_segmentation(t1)
    other, other_seg = _other_patient(mrml, t1)
    tissue = read_volume(TISSUE, label=True).array
    query = io.node_to_volume(t1)
    entries = [io.ExampleSlice(t1, 0, 30, seg), io.ExampleSlice(other, 0, 45, other_seg),
               io.ExampleSlice(t1, 0, 50, seg)]
    axis, own = io.run_axis(entries, t1, query)
    assert (axis, own) == (0, [30, 50])
    got = io.gather_examples(entries, t1, query, axis, "segment", "mr", ["grey matter"])
    assert len(got.groups) == 1 and got.groups[0].names == ["grey matter"]
    by_index = {(e.slice_index, e.image.shape): e for e in got.groups[0].examples}
    own30 = by_index[(30, (94, 77))]
    np.testing.assert_array_equal(own30.target, (tissue[30] == 1).astype(np.uint8))
    np.testing.assert_array_equal(own30.image, query.array[30])
    second = by_index[(None, (94, 77))]  # from the other volume: context only, no slice index
    np.testing.assert_array_equal(second.image, np.roll(query.array, 3, axis=1)[45])
    np.testing.assert_array_equal(second.target, np.roll(tissue == 1, 3, axis=1)[45].astype(np.uint8))
    assert got.colors["grey matter"] == pytest.approx((0.9, 0.6, 0.2))  # first example's colour


def test_examples_only_from_another_volume_use_the_matching_anatomical_axis(mrml: Scene) -> None:
    t1 = mrml.load_volume(T1, "t1")
    other, other_seg = _other_patient(mrml, t1)
    matrix = np.eye(4)
    matrix[:3, :3] = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]]) * 2.0  # k runs along R
    query_node = mrml.add_volume(np.zeros((20, 21, 22), np.float32), matrix, "sagittal query")
    entries = [io.ExampleSlice(other, 0, 45, other_seg)]  # an axial slice of the other volume
    axis, own = io.run_axis(entries, query_node, io.node_to_volume(query_node))
    assert (axis, own) == (1, [])  # axial (S) is along j for the query = numpy axis 1
    got = io.gather_examples(entries, query_node, io.node_to_volume(query_node), axis, "segment", "mr")
    assert [e.slice_index for e in got.groups[0].examples] == [None]


def test_overlapping_segments_become_separate_groups(mrml: Scene) -> None:
    t1 = mrml.load_volume(T1, "t1")
    seg = mrml.tissue_segmentation(t1)
    brain = io.segment_masks(seg, ["grey matter", "white matter"], t1)
    io.add_segments(seg, t1, [("brain", None, brain["grey matter"] | brain["white matter"])])
    got = io.gather_examples([io.ExampleSlice(t1, 0, 40, seg)], t1, io.node_to_volume(t1), 0, "segment", "mr")
    assert [g.names for g in got.groups] == [["grey matter", "white matter"], ["brain"]]
    assert set(np.unique(got.groups[0].examples[0].target)) == {0, 1, 2}


def test_cropped_query_shifts_its_own_examples(mrml: Scene) -> None:
    t1 = mrml.load_volume(T1, "t1")
    seg = mrml.tissue_segmentation(t1)
    full = io.node_to_volume(t1)
    part = Volume(io.crop_along(full.array, 0, 25, 31), full.spacing, full.origin, full.direction)
    got = io.gather_examples([io.ExampleSlice(t1, 0, 30, seg)], t1, part, 0, "segment", "mr", offset=25)
    example = got.groups[0].examples[0]
    assert example.slice_index == 5
    np.testing.assert_array_equal(example.image, full.array[30])


def test_example_mistakes_are_explained(mrml: Scene) -> None:
    t1 = mrml.load_volume(T1, "t1")
    seg = mrml.tissue_segmentation(t1)
    query = io.node_to_volume(t1)
    with pytest.raises(InputError, match="different view directions"):
        io.run_axis([io.ExampleSlice(t1, 0, 30, seg), io.ExampleSlice(t1, 1, 40, seg)], t1, query)
    with pytest.raises(InputError, match="needs a segmentation node"):
        io.gather_examples([io.ExampleSlice(t1, 0, 30, t1)], t1, query, 0, "segment", "mr")
    with pytest.raises(InputError, match="needs a scalar volume node"):
        io.gather_examples([io.ExampleSlice(t1, 0, 30, seg)], t1, query, 0, "denoise", "mr")
    with pytest.raises(InputError, match="no segment named 'liver'"):
        io.gather_examples([io.ExampleSlice(t1, 0, 30, seg)], t1, query, 0, "segment", "mr", ["liver"])
    with pytest.raises(InputError, match="Add current slice"):
        io.run_axis([], t1, query)
    io.add_segments(seg, t1, [("tumour", None, np.zeros(query.shape, bool))])
    with pytest.raises(InputError, match="'tumour' are empty on every example slice"):
        io.gather_examples([io.ExampleSlice(t1, 0, 30, seg)], t1, query, 0, "segment", "mr")
    mrml.scene.RemoveNode(seg)
    with pytest.raises(InputError, match="example 1 refers to a volume or target that was deleted"):
        io.run_axis([io.ExampleSlice(t1, 0, 30, None)], t1, query)


def test_image_task_targets_must_share_the_grid(mrml: Scene) -> None:
    t1 = mrml.load_volume(T1, "t1")
    clean = mrml.load_volume(T1, "clean")
    query = io.node_to_volume(t1)
    got = io.gather_examples([io.ExampleSlice(t1, 2, 38, clean)], t1, query, 2, "denoise", "mr")
    np.testing.assert_array_equal(got.groups[0].examples[0].target, query.array[:, :, 38])
    moved = mrml.load_volume(T1, "moved")
    moved.SetOrigin(0.0, 0.0, 0.0)
    with pytest.raises(InputError, match="not on the grid of 't1'"):
        io.gather_examples([io.ExampleSlice(t1, 2, 38, moved)], t1, query, 2, "synthesize", "mr")


# -- result nodes ------------------------------------------------------------------------------
def _in_folder(mrml: Scene, node, folder_name: str = "Patient 1") -> int:
    shn = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.scene)
    folder = shn.CreateFolderItem(shn.GetSceneItemID(), folder_name)
    shn.CreateItem(folder, node)
    return folder


def test_new_segmentation_node_geometry_and_place(mrml: Scene) -> None:
    node = _oblique_volume(mrml)
    folder = _in_folder(mrml, node)
    seg = io.new_segmentation_node(node, "oblique segmentation")
    a, _ = _overlapping_masks((12, 15, 18))
    io.add_segments(seg, node, [("organ", (1.0, 0.0, 0.0), a)])
    geometry = slicer.vtkOrientedImageData()  # the reference geometry Slicer stores with the node
    assert slicer.vtkSegmentationConverter.DeserializeImageGeometry(seg.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()), geometry)
    matrix = vtk.vtkMatrix4x4()
    geometry.GetImageToWorldMatrix(matrix)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix), io.ijk_to_ras(node), atol=1e-5)
    assert geometry.GetExtent() == (0, 17, 0, 14, 0, 11)
    labelmap = mrml.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")  # exported with its own geometry
    assert slicer.modules.segmentations.logic().ExportVisibleSegmentsToLabelmapNode(seg, labelmap)
    assert np.allclose(io.ijk_to_ras(labelmap)[:3, :3], io.ijk_to_ras(node)[:3, :3])
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()) is node
    shn = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.scene)
    assert shn.GetItemParent(shn.GetItemByDataNode(seg)) == folder


def test_new_volume_node_copies_geometry_transform_and_place(mrml: Scene) -> None:
    node = _oblique_volume(mrml)
    transform = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetAndObserveTransformNodeID(transform.GetID())
    folder = _in_folder(mrml, node)
    array = np.random.default_rng(1).random((12, 15, 18)).astype(np.float32)
    out = io.new_volume_node(node, array, "oblique denoised")
    assert out is not node and out.GetName() == "oblique denoised"
    np.testing.assert_allclose(io.ijk_to_ras(out), io.ijk_to_ras(node), atol=1e-9)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(out), array)
    assert out.GetTransformNodeID() == transform.GetID()
    shn = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.scene)
    assert shn.GetItemParent(shn.GetItemByDataNode(out)) == folder
    with pytest.raises(ValueError, match="does not match"):
        io.new_volume_node(node, array[1:], "wrong")


# -- the panel's segment list --------------------------------------------------------------------
def test_segment_list_keys_ticks_by_id_and_follows_changes(mrml: Scene) -> None:
    """Unticked segments are remembered by id: a rename keeps the tick, a new segment is ticked,
    and the watcher tells the panel about every add, rename and removal (then stops when told)."""
    node = mrml.load_volume(T1, "t1")
    seg = mrml.tissue_segmentation(node)
    segmentation = seg.GetSegmentation()
    grey = segmentation.GetSegmentIdBySegmentName("grey matter")
    calls = []
    watcher = io.SegmentListWatcher(lambda: calls.append(len(io.segment_rows(seg, [grey]))))
    watcher.watch(seg)
    assert [(n, t) for _i, n, t in io.segment_rows(seg, [grey])] == [("grey matter", False), ("white matter", True)]
    assert io.ticked_segment_names(seg, [grey]) == ["white matter"]
    assert io.ticked_segment_names(seg, []) is None  # nothing unticked: run them all
    segmentation.GetSegment(grey).SetName("cortex")
    assert [(n, t) for _i, n, t in io.segment_rows(seg, [grey])][0] == ("cortex", False) and calls
    added = segmentation.AddEmptySegment("", "lesion")
    assert calls[-1] == 3 and io.segment_rows(seg, [grey])[-1] == (added, "lesion", True)
    segmentation.RemoveSegment(added)
    assert calls[-1] == 2
    count = len(calls)
    watcher.stop()
    segmentation.AddEmptySegment("", "after stop")
    assert len(calls) == count and io.segment_rows(None, []) == []


def test_results_show_in_3d_and_previews_do_not(mrml: Scene) -> None:
    node = _oblique_volume(mrml)
    a, b = _overlapping_masks((12, 15, 18))
    result = io.new_segmentation_node(node, "result")
    io.add_segments(result, node, [("organ", None, a)])
    assert result.GetSegmentation().ContainsRepresentation("Closed surface")
    surface = result.GetSegmentation().GetNthSegment(0).GetRepresentation("Closed surface")
    assert surface.GetNumberOfPoints() > 0
    preview = io.new_segmentation_node(node, "preview")
    io.add_segments(preview, node, [("organ", None, a)], surface=False)
    assert not preview.GetSegmentation().ContainsRepresentation("Closed surface")


def test_remove_node_takes_its_display_and_storage_nodes_along(mrml: Scene) -> None:
    node = _oblique_volume(mrml)
    before = {mrml.scene.GetNthNode(i).GetID() for i in range(mrml.scene.GetNumberOfNodes())}
    seg = io.new_segmentation_node(node, "scratch")
    seg.AddDefaultStorageNode()
    io.remove_node(seg)
    assert {mrml.scene.GetNthNode(i).GetID() for i in range(mrml.scene.GetNumberOfNodes())} == before
