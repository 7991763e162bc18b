"""'Fill from examples' in the Segment Editor: the effect's work, without Qt.

The user paints the selected segment on a few slices; those painted slices are the examples, the
engine propagates them through the editor's source volume, the result is shown as a preview
segmentation, and Apply writes it into the selected segment through the editor's own method, so
that undo, masking ("Editable area", "Editable intensity range") and the overwrite setting work
as for every other effect. Painting one more slice and pressing Update runs again.

Seams, so that this file runs headlessly on real MRML (tests) and inside Slicer alike:
- `Runner`: a callable that runs an `EngineJob` (numpy only, so it can be handed to a worker
  process as is) and returns the segment's voxels, or None when cancelled. `in_process_runner`
  runs the engine here; the module may plug its worker process instead.
- `EditorActions`: the two calls of Slicer's effect API that touch the segmentation
  (`saveStateForUndo`, `modifySelectedSegmentByLabelmap`). The effect passes its
  scriptedEffect; tests pass Slicer's own vtkSlicerSegmentEditorLogic behind the same names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import slicer
import vtk

from MedicalGeneralistLib import slicer_io
from medgen.core.errors import InputError
from medgen.core.volume import Volume, anatomical_axis

MRMLNode = Any
Progress = Callable[[float, str], None]
Cancel = Callable[[], bool]
PREVIEW_ROLE = "MedicalGeneralistFillFromExamplesPreview"  # the editor node's reference to the preview
DIRECTIONS = ("auto", "axial", "coronal", "sagittal")
MAX_EXAMPLE_SLICES = 40  # more painted slices than this is a 3D-painted segment, not examples


@dataclass(frozen=True)
class EngineJob:
    """Everything the engine needs, as numpy and plain values (picklable for a worker process).

    target: the selected segment on the source grid (1 inside); `slices` along `axis` are the
    painted ones, the examples.
    """

    image: Volume
    target: np.ndarray
    axis: int
    slices: tuple[int, ...]
    modality: str = "other"
    device: str = "auto"
    model: str | None = None

    def fingerprint(self) -> str:
        """Same fingerprint = same result: Update with nothing changed needs no new run."""
        digest = hashlib.sha1()
        digest.update(np.ascontiguousarray(self.image.array).tobytes())
        digest.update(np.packbits(self.target != 0).tobytes())
        digest.update(repr((self.image.spacing, self.image.origin, self.image.direction, self.axis,
                            self.slices, self.modality, self.device, self.model)).encode())
        return digest.hexdigest()


Runner = Callable[[EngineJob, Progress, Cancel], "np.ndarray | None"]


class EditorActions(Protocol):
    def saveStateForUndo(self) -> None: ...

    def modifySelectedSegmentByLabelmap(self, labelmap: Any, mode: str) -> None: ...


# -- examples from the selected segment --------------------------------------------------------
def painted_slices(mask: np.ndarray, axis: int) -> list[int]:
    other = tuple(a for a in range(3) if a != axis)
    return [int(i) for i in np.nonzero(mask.any(axis=other))[0]]


def choose_axis(mask: np.ndarray, image: Volume, direction: str = "auto") -> int:
    """The numpy axis the user painted along: the named direction, or (auto) the axis on which
    the fewest slices are painted, relative to its length (a structure painted on 3 axial slices
    touches dozens of coronal and sagittal ones). Ties go to the axial direction."""
    if direction != "auto":
        if direction not in DIRECTIONS:
            raise InputError(f"unknown direction {direction!r}: choose one of {', '.join(DIRECTIONS)}")
        return anatomical_axis(direction, image)
    axial = anatomical_axis("axial", image)
    return min(range(3), key=lambda a: (len(painted_slices(mask, a)) / mask.shape[a], a != axial))


def make_job(source: MRMLNode, segmentation: MRMLNode, segment_id: str, direction: str = "auto",
             modality: str = "auto", device: str = "auto", model: str | None = None) -> EngineJob:
    """Read the editor's inputs (a snapshot): the source volume and the selected segment."""
    if segmentation is None or not segment_id:
        raise InputError("no segment is selected: select the segment you painted in the segment list")
    image = slicer_io.node_to_volume(source, "source volume")
    mask = slicer_io.segment_mask(segmentation, segment_id, source)
    name = segmentation.GetSegmentation().GetSegment(segment_id).GetName()
    if not mask.any():
        raise InputError(f"segment '{name}' is empty inside the source volume: paint it on a few "
                         "slices (one direction, e.g. axial), then press Initialize")
    axis = choose_axis(mask, image, direction)
    slices = painted_slices(mask, axis)
    if len(slices) > MAX_EXAMPLE_SLICES:
        raise InputError(f"segment '{name}' covers {len(slices)} slices in that direction: Fill from "
                         f"examples needs a few painted slices (at most {MAX_EXAMPLE_SLICES}). Paint "
                         "on separate slices of one view, or use a new segment")
    if len(slices) == mask.shape[axis]:
        raise InputError(f"segment '{name}' is already painted on every slice: nothing is left to fill")
    if modality == "auto":
        from medgen.core.intensity import guess_modality

        modality = guess_modality(image.array)
    return EngineJob(image, mask.astype(np.uint8), axis, tuple(slices), modality, device, model)


# -- the engine, in this process ---------------------------------------------------------------
@lru_cache(maxsize=2)
def _model(spec: str | None):
    from medgen.io.weights import load_model

    return load_model(spec, device="cpu")[0]


def in_process_runner(model=None) -> Runner:
    """A Runner that calls the engine here (the model is loaded once and kept for Update)."""

    def run(job: EngineJob, progress: Progress, cancel: Cancel) -> np.ndarray | None:
        from medgen.infer.pipeline import RunOptions, run as run_engine
        from medgen.prompts import pairs_from_volumes

        net = model if model is not None else _model(job.model)
        examples = pairs_from_volumes(job.image, job.image.with_array(job.target), job.axis,
                                      list(job.slices), "segment", job.modality, True)
        options = RunOptions("segment", job.axis, job.modality, job.device)
        out = run_engine(net, job.image, examples, options, progress=progress, cancel=cancel)
        return None if out is None else out.array != 0

    return run


def default_runner() -> Runner:
    """The runner the Segment Editor effect uses: the one place to plug a worker process in."""
    return in_process_runner()


# -- preview, apply, cancel --------------------------------------------------------------------
@dataclass
class FillFromExamples:
    """The effect's state between Initialize/Update, Apply and Cancel.

    The last result is kept with its job's fingerprint: Update with unchanged inputs shows it
    again instead of running. The engine itself re-encodes the example pairs on every run (one
    encoder pass per painted slice); the model stays loaded between runs.
    """

    runner: Runner
    runs: int = 0
    _last: tuple[str, np.ndarray] | None = field(default=None, repr=False)

    def preview(self, editor_node: MRMLNode, direction: str = "auto", progress: Progress | None = None,
                cancel: Cancel | None = None, **job_options) -> MRMLNode | None:
        """Run (or reuse) and show the result as a preview segmentation; None if cancelled."""
        source, segmentation = editor_node.GetSourceVolumeNode(), editor_node.GetSegmentationNode()
        segment_id = editor_node.GetSelectedSegmentID()
        job = make_job(source, segmentation, segment_id, direction, **job_options)
        key = job.fingerprint()
        if self._last is not None and self._last[0] == key:
            result = self._last[1]
        else:
            result = self.runner(job, progress or (lambda f, m: None), cancel or (lambda: False))
            if result is None:
                return None
            self.runs += 1
            self._last = (key, result)
        segment = segmentation.GetSegmentation().GetSegment(segment_id)
        return _show_preview(editor_node, source, segment, result)

    def apply(self, editor_node: MRMLNode, editor: EditorActions) -> None:
        """Write the preview into the selected segment through the editor (undo state first)."""
        preview = preview_node(editor_node)
        if preview is None:
            raise InputError("there is no preview to apply: press Initialize first")
        source = editor_node.GetSourceVolumeNode()
        mask = slicer_io.segment_mask(preview, preview.GetSegmentation().GetNthSegmentID(0), source)
        labelmap = oriented_labelmap(mask, source, editor_node.GetSegmentationNode())
        editor.saveStateForUndo()
        editor.modifySelectedSegmentByLabelmap(labelmap, "Set")
        self.cancel(editor_node)

    def cancel(self, editor_node: MRMLNode) -> None:
        """Remove the preview; the segmentation is left as it is."""
        preview = preview_node(editor_node)
        editor_node.SetNodeReferenceID(PREVIEW_ROLE, None)
        if preview is not None:
            slicer_io.remove_node(preview)


def preview_node(editor_node: MRMLNode) -> MRMLNode | None:
    return editor_node.GetNodeReference(PREVIEW_ROLE)


def _show_preview(editor_node: MRMLNode, source: MRMLNode, segment: MRMLNode, mask: np.ndarray) -> MRMLNode:
    preview = preview_node(editor_node)
    if preview is None:
        preview = slicer_io.new_segmentation_node(source, f"{segment.GetName()} preview")
        editor_node.SetNodeReferenceID(PREVIEW_ROLE, preview.GetID())
    else:
        preview.GetSegmentation().RemoveAllSegments()
    slicer_io.add_segments(preview, source, [(segment.GetName(), tuple(segment.GetColor()), mask)], surface=False)
    display = preview.GetDisplayNode()
    if display is not None:
        display.SetOpacity2DFill(0.6)
    return preview


def oriented_labelmap(mask: np.ndarray, reference: MRMLNode, segmentation: MRMLNode):
    """The mask as a vtkOrientedImageData on the segmentation's own labelmap grid.

    That is the grid the editor's modifier labelmaps have (`defaultModifierLabelmap`), in the
    segmentation's coordinates: the editor masks and replaces voxels on it, so a mask on the
    volume's grid is resampled there (nearest neighbour), through the transforms when volume
    and segmentation have different parent transforms. Full extent, so 'Set' replaces the whole
    segment rather than a box around the structure."""
    with slicer_io.temporary_labelmap(reference) as labelmap:
        slicer.util.updateVolumeFromArray(labelmap, mask.astype(np.uint8))
        image = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(labelmap)
    geometry = slicer.vtkOrientedImageData()
    text = segmentation.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    if not text or not slicer.vtkSegmentationConverter.DeserializeImageGeometry(text, geometry, False):
        geometry.ShallowCopy(image)  # no reference geometry yet: the volume's grid
    between = None
    if reference.GetTransformNodeID() != segmentation.GetTransformNodeID():
        between = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(
            reference.GetParentTransformNode(), segmentation.GetParentTransformNode(), between)
    out = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            image, geometry, out, False, False, between):
        raise InputError(f"cannot bring the result onto the grid of segmentation '{segmentation.GetName()}'")
    return out


__all__ = ["EngineJob", "Runner", "EditorActions", "FillFromExamples", "make_job", "painted_slices",
           "choose_axis", "in_process_runner", "default_runner", "oriented_labelmap", "preview_node", "PREVIEW_ROLE",
           "DIRECTIONS"]
