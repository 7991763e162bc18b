"""The 'Fill from examples' Segment Editor effect's logic, and 'Show' in standard orientations.

Real MRML from the slicer-core wheel throughout: Slicer's own segment editor logic
(vtkSlicerSegmentEditorLogic, the C++ half of the Segment Editor that the effect API calls into)
applies the result, so masking, overwrite and undo are Slicer's, not ours. Only the two calls of
the Qt-bound scriptedEffect API are routed to it by a small recorder (`Editor`). The engine is
behind the effect's Runner seam: most tests plug a runner that answers with the template's own
white-matter labels (the engine is tested elsewhere); the `model` test runs the shipped model.
"""

from __future__ import annotations

import numpy as np
import pytest

from test_slicer_scene import T1, TISSUE, Scene, mrml, oblique_ijk_to_ras, slicer, vtk  # noqa: F401

from MedicalGeneralistLib import effect_logic as fx  # noqa: E402
from MedicalGeneralistLib import slicer_io  # noqa: E402
from medgen.core.errors import InputError  # noqa: E402

pytestmark = pytest.mark.slicer
PAINTED = (30, 38, 46)  # axial slices (numpy axis 0 of the RAS-aligned template)


class Editor:
    """Slicer's segment editor logic behind the effect API's two calls; records the calls."""

    def __init__(self, mrml: Scene, segmentation, volume, segment_id: str) -> None:
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(mrml.scene)
        self.logic.SetMRMLApplicationLogic(mrml.app)
        self.node = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        self.logic.SetSegmentEditorNode(self.node)
        self.node.SetAndObserveSegmentationNode(segmentation)
        self.node.SetAndObserveSourceVolumeNode(volume)
        self.node.SetSelectedSegmentID(segment_id)
        self.calls: list = []

    def saveStateForUndo(self) -> None:
        self.calls.append("saveStateForUndo")
        assert self.logic.SaveStateForUndo()

    def modifySelectedSegmentByLabelmap(self, labelmap, mode: str) -> None:
        self.calls.append(("modifySelectedSegmentByLabelmap", mode))
        self.logic.ModifySegmentByLabelmap(self.node.GetSegmentationNode(), self.node.GetSelectedSegmentID(),
                                           labelmap, getattr(self.logic, "ModificationMode" + mode), True, False)


class Case:
    """The template with its tissue segments and a new segment painted (white matter) on
    three axial slices, selected in a segment editor."""

    def __init__(self, mrml: Scene) -> None:
        self.mrml = mrml
        self.volume = mrml.load_volume(T1, "t1")
        self.seg = mrml.tissue_segmentation(self.volume)
        self.truth = slicer_io.segment_masks(self.seg, ["white matter"], self.volume)["white matter"]
        self.painted = np.zeros_like(self.truth)
        self.painted[list(PAINTED)] = self.truth[list(PAINTED)]
        self.segment_id = self.seg.GetSegmentation().AddEmptySegment("", "structure", [0.2, 0.8, 0.3])
        self.paint(self.painted)
        self.editor = Editor(mrml, self.seg, self.volume, self.segment_id)

    def paint(self, mask: np.ndarray) -> None:
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), self.seg, self.segment_id, self.volume)

    def mask(self, name: str | None = None) -> np.ndarray:
        if name is None:
            return slicer_io.segment_mask(self.seg, self.segment_id, self.volume)
        return slicer_io.segment_masks(self.seg, [name], self.volume)[name]


class AnswerRunner:
    """A Runner that answers every job with a fixed mask, and keeps the jobs it was given."""

    def __init__(self, answer: np.ndarray | None) -> None:
        self.answer, self.jobs = answer, []

    def __call__(self, job, progress, cancel):
        self.jobs.append(job)
        progress(1.0, "done")
        return None if self.answer is None else self.answer.copy()


@pytest.fixture
def case(mrml: Scene) -> Case:
    return Case(mrml)


# -- examples ----------------------------------------------------------------------------------
def test_examples_are_the_painted_slices_of_the_selected_segment(case: Case) -> None:
    job = fx.make_job(case.volume, case.seg, case.segment_id)
    assert (job.axis, job.slices) == (0, PAINTED)
    np.testing.assert_array_equal(job.target != 0, case.painted)
    np.testing.assert_array_equal(job.image.array, slicer.util.arrayFromVolume(case.volume))
    assert fx.make_job(case.volume, case.seg, case.segment_id, direction="axial").slices == PAINTED
    coronal = np.zeros_like(case.truth)
    coronal[:, [40, 50]] = case.truth[:, [40, 50]]
    case.paint(coronal)
    job = fx.make_job(case.volume, case.seg, case.segment_id)
    assert (job.axis, job.slices) == (1, (40, 50))


def test_empty_or_3d_painted_segments_are_refused_with_what_to_do(case: Case) -> None:
    empty = case.seg.GetSegmentation().AddEmptySegment("", "nothing yet")
    with pytest.raises(InputError, match="'nothing yet' is empty.*paint it on a few slices"):
        fx.make_job(case.volume, case.seg, empty)
    grey = case.seg.GetSegmentation().GetSegmentIdBySegmentName("grey matter")
    with pytest.raises(InputError, match=r"'grey matter' covers \d+ slices.*at most 40"):
        fx.make_job(case.volume, case.seg, grey)
    with pytest.raises(InputError, match="no segment is selected"):
        fx.make_job(case.volume, case.seg, "")


# -- preview, apply, undo ----------------------------------------------------------------------
def test_preview_then_apply_writes_the_selected_segment_with_undo(case: Case) -> None:
    runner = AnswerRunner(case.truth)
    effect = fx.FillFromExamples(runner)
    grey_before = case.mask("grey matter")
    preview = effect.preview(case.editor.node)
    assert fx.preview_node(case.editor.node) is preview and preview is not case.seg
    np.testing.assert_array_equal(slicer_io.segment_mask(preview, preview.GetSegmentation().GetNthSegmentID(0), case.volume),
                                  case.truth)
    assert preview.GetSegmentation().GetNthSegment(0).GetColor() == pytest.approx((0.2, 0.8, 0.3))
    np.testing.assert_array_equal(case.mask(), case.painted)  # the preview changes nothing yet
    assert case.editor.calls == []

    effect.apply(case.editor.node, case.editor)
    assert case.editor.calls == ["saveStateForUndo", ("modifySelectedSegmentByLabelmap", "Set")]
    np.testing.assert_array_equal(case.mask(), case.truth)
    np.testing.assert_array_equal(case.mask("grey matter"), grey_before)  # default: overwrite none here
    assert fx.preview_node(case.editor.node) is None and not case.mrml.scene.IsNodePresent(preview)

    case.editor.logic.Undo()  # Ctrl+Z in the editor
    np.testing.assert_array_equal(case.mask(), case.painted)


def test_apply_respects_the_editable_area(case: Case) -> None:
    """Editable area 'inside segment allowed': only voxels inside it change; the rest keeps the
    segment as it was (the painted slices outside the area included)."""
    allowed = np.zeros_like(case.truth)
    allowed[:, :, :40] = True  # the left half of the image
    allowed_id = case.seg.GetSegmentation().AddEmptySegment("", "allowed")
    slicer.util.updateSegmentBinaryLabelmapFromArray(allowed.astype(np.uint8), case.seg, allowed_id, case.volume)
    case.editor.node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    case.editor.node.SetMaskSegmentID(allowed_id)
    effect = fx.FillFromExamples(AnswerRunner(case.truth))
    effect.preview(case.editor.node)
    effect.apply(case.editor.node, case.editor)
    after = case.mask()
    np.testing.assert_array_equal(after[allowed], case.truth[allowed])
    np.testing.assert_array_equal(after[~allowed], case.painted[~allowed])
    assert (case.truth & ~allowed & ~case.painted).any()  # there was something outside to refuse


def test_apply_respects_the_intensity_range(case: Case) -> None:
    image = slicer.util.arrayFromVolume(case.volume)
    case.editor.node.SetSourceVolumeIntensityMask(True)
    lowest = float(np.median(image[case.truth]))  # half of the white matter is out of range
    case.editor.node.SetSourceVolumeIntensityMaskRange(lowest, 255)
    effect = fx.FillFromExamples(AnswerRunner(case.truth))
    effect.preview(case.editor.node)
    effect.apply(case.editor.node, case.editor)
    after, bright = case.mask(), image >= lowest
    np.testing.assert_array_equal(after[bright], case.truth[bright])
    np.testing.assert_array_equal(after[~bright], case.painted[~bright])
    assert (case.truth & ~bright & ~case.painted).any()


@pytest.mark.parametrize("overwrite", ["OverwriteNone", "OverwriteAllSegments"])
def test_apply_honours_the_overwrite_setting(case: Case, overwrite: str) -> None:
    from scipy import ndimage

    grown = ndimage.binary_dilation(case.truth, iterations=2)  # reaches into grey matter
    grey_before = case.mask("grey matter")
    assert (grown & grey_before).any()
    case.editor.node.SetOverwriteMode(getattr(slicer.vtkMRMLSegmentEditorNode, overwrite))
    effect = fx.FillFromExamples(AnswerRunner(grown))
    effect.preview(case.editor.node)
    effect.apply(case.editor.node, case.editor)
    np.testing.assert_array_equal(case.mask(), grown)
    expected = grey_before if overwrite == "OverwriteNone" else grey_before & ~grown
    np.testing.assert_array_equal(case.mask("grey matter"), expected)


def test_update_runs_again_only_when_the_examples_changed(case: Case) -> None:
    runner = AnswerRunner(case.truth)
    effect = fx.FillFromExamples(runner)
    first = effect.preview(case.editor.node)
    assert effect.preview(case.editor.node) is first and effect.runs == 1  # Update, nothing changed
    more = case.painted.copy()
    more[34] = case.truth[34]  # paint one more slice
    case.paint(more)
    assert effect.preview(case.editor.node) is first and effect.runs == 2
    assert runner.jobs[-1].slices == (30, 34, 38, 46)
    assert case.mrml.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2


def test_cancel_and_cancelled_runs_leave_the_segmentation_as_it_was(case: Case) -> None:
    before = case.mrml.snapshot()
    effect = fx.FillFromExamples(AnswerRunner(None))  # the run was cancelled
    assert effect.preview(case.editor.node) is None
    assert case.mrml.snapshot() == before
    effect = fx.FillFromExamples(AnswerRunner(case.truth))
    effect.preview(case.editor.node)
    effect.cancel(case.editor.node)
    assert case.mrml.snapshot() == before
    with pytest.raises(InputError, match="press Initialize first"):
        effect.apply(case.editor.node, case.editor)
    assert case.editor.calls == []


def test_segmentation_under_its_own_transform_gets_the_volumes_voxels(case: Case) -> None:
    """The editor compares geometries in the segmentation's frame: a segmentation moved by its
    own transform still receives the result on the volume's voxels (in world space)."""
    transform = case.mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = [20.0, 0.0, 0.0]  # ten voxels to the right
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    case.seg.SetAndObserveTransformNodeID(transform.GetID())
    effect = fx.FillFromExamples(AnswerRunner(case.truth))
    effect.preview(case.editor.node)
    effect.apply(case.editor.node, case.editor)
    world = case.mask()  # read on the volume's grid, in world space
    # the segmentation's own grid moved ten voxels right with it: the editor writes only there,
    # as it does when painting; there the result sits on the volume's voxels, old voxels cleared
    np.testing.assert_array_equal(world[:, :, 10:], case.truth[:, :, 10:])
    assert not world[:, :, :10].any() and case.truth[:, :, :10].any()


@pytest.mark.model
def test_fill_from_three_painted_slices_with_the_shipped_model(case: Case, model, record_property) -> None:
    effect = fx.FillFromExamples(fx.in_process_runner(model))
    messages = []
    preview = effect.preview(case.editor.node, device="cpu", progress=lambda f, m: messages.append(f))
    result = slicer_io.segment_mask(preview, preview.GetSegmentation().GetNthSegmentID(0), case.volume)
    for k in PAINTED:
        np.testing.assert_array_equal(result[k], case.truth[k])
    span = slice(PAINTED[0], PAINTED[-1] + 1)
    a, b = result[span], case.truth[span]
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    near = np.stack([case.truth[min(PAINTED, key=lambda p: abs(p - k))] for k in range(*span.indices(80))])
    baseline = 2 * (near & b).sum() / (near.sum() + b.sum())  # copy the nearest painted slice
    record_property("dice_effect_wm_between_3_axial", round(float(dice), 3))
    record_property("dice_nearest_painted_slice_baseline", round(float(baseline), 3))
    assert dice > 0.7 and messages and messages[-1] == 1.0
    effect.apply(case.editor.node, case.editor)
    np.testing.assert_array_equal(case.mask(), result)


# -- 'Show' in Slicer's standard orientations ---------------------------------------------------
def _preset(name: str) -> np.ndarray:
    matrix = vtk.vtkMatrix3x3()
    getattr(slicer.vtkMRMLSliceNode, f"Get{name}SliceToRASMatrix")(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])


@pytest.mark.parametrize("axis, name", [(0, "Axial"), (1, "Coronal"), (2, "Sagittal")])
@pytest.mark.parametrize("flip", [(1, 1, 1), (-1, -1, 1), (1, -1, -1)])
def test_show_keeps_the_standard_orientation(mrml: Scene, axis: int, name: str, flip) -> None:
    """RAS-, LPS- and otherwise flipped voxel orders all show as Slicer's own preset (not a
    'Reformat' with the normal reversed), and the shown slice is the one asked for."""
    matrix = np.diag([*(2.0 * np.asarray(flip)), 1.0])
    matrix[:3, 3] = [-50.0, 20.0, 5.0]
    volume = mrml.add_volume(np.zeros((20, 30, 40), np.int16), matrix, "scan")
    index = {0: 7, 1: 12, 2: 25}[axis]
    for view in (mrml.slice_node("Red"), slicer.vtkMRMLSliceNode()):  # in a layout, and bare
        view.SetLayoutName(view.GetLayoutName() or "Yellow")
        slicer_io.show_slice(view, volume, axis, index)
        assert view.GetOrientation() == name
        np.testing.assert_allclose(slicer_io.matrix_to_array(view.GetSliceToRAS())[:3, :3], _preset(name), atol=1e-9)
        assert slicer_io.slice_axis_index(view, volume) == (axis, index)


def test_show_on_an_oblique_volume_aligns_with_its_voxels(mrml: Scene) -> None:
    volume = mrml.add_volume(np.zeros((12, 15, 18), np.float32), oblique_ijk_to_ras(), "oblique")
    view = mrml.slice_node("Red")
    slicer_io.show_slice(view, volume, 0, 4)
    assert slicer_io.slice_axis_index(view, volume) == (0, 4)
    normal = slicer_io.matrix_to_array(view.GetSliceToRAS())[:3, 2]
    assert normal @ _preset("Axial")[:, 2] > 0  # the preset's side, not the reversed normal
