"""MRML nodes <-> engine data: volumes, slice views, segments, example slices, result nodes.

Everything the Slicer module needs to turn what the user sees (volume nodes, a slice view, the
segments they painted) into the engine's numpy `Volume` and `Example`s, and the engine's output
back into NEW nodes. It imports no Qt and never touches `slicer.app`, so the pytest suite runs it
on real MRML classes from the `slicer-core` wheel.

Conventions (the same as SimpleITK's and Slicer's `arrayFromVolume`): arrays are (K, J, I);
numpy axis `a` is IJK index axis `2 - a`; `Volume` geometry is LPS, MRML geometry is RAS.
Reading never modifies a node; writing only ever creates nodes or adds segments.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import slicer
import slicer.util
import vtk

from medgen.core.errors import InputError
from medgen.prompts import Example, check_pair, pairs_from_volumes
from medgen.core.volume import Volume

MRMLNode = Any  # MRML classes come from the running Slicer or the slicer-core wheel
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
OBLIQUE_TOLERANCE_DEG = 0.5


# -- geometry ----------------------------------------------------------------------------------
def matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijk_to_ras(node: MRMLNode) -> np.ndarray:
    """The node's own IJK-to-RAS matrix (4x4), without parent transforms."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix_to_array(matrix)


def ijk_to_world(node: MRMLNode) -> np.ndarray:
    """IJK to world RAS, through a linear parent transform: what slice views actually show."""
    matrix = ijk_to_ras(node)
    transform = node.GetParentTransformNode()
    if transform is None:
        return matrix
    if not transform.IsTransformToWorldLinear():
        raise InputError(f"volume '{node.GetName()}' is under a non-linear transform: harden the "
                         "transform (Data module, right-click > Harden transform) before using it")
    to_world = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(to_world)
    return matrix_to_array(to_world) @ matrix


def check_scalar_volume(node: MRMLNode, role: str = "volume") -> None:
    """Refuse what the engine cannot read, naming the node, before any work starts."""
    if node is None:
        raise InputError(f"no {role} is selected: choose a volume first")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"{role} '{node.GetName()}' is a {node.GetClassName()}: choose a scalar volume")
    image = node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise InputError(f"{role} '{node.GetName()}' holds no voxels: load the image again")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f"{role} '{node.GetName()}' has {image.GetNumberOfScalarComponents()} components "
                         "per voxel: convert it to a single-component (grey) volume first")


def node_to_volume(node: MRMLNode, role: str = "volume") -> Volume:
    """A copy of the node's voxels with its geometry in LPS (what files and the engine use)."""
    check_scalar_volume(node, role)
    array = np.array(slicer.util.arrayFromVolume(node), copy=True)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"{role} '{node.GetName()}' has NaN or Inf voxels: replace them first")
    matrix = ijk_to_ras(node)
    spacing = np.asarray(node.GetSpacing(), dtype=float)
    directions = matrix[:3, :3] / spacing  # columns: unit RAS vectors of the i, j, k axes
    return Volume(array=array, spacing=tuple(float(s) for s in spacing),
                  origin=tuple(float(v) for v in LPS_FROM_RAS @ matrix[:3, 3]),
                  direction=tuple(float(v) for v in (LPS_FROM_RAS @ directions).ravel()),
                  is_2d=array.shape[0] == 1)


def volume_ijk_to_ras(volume: Volume) -> np.ndarray:
    """The inverse of `node_to_volume`'s geometry conversion (LPS Volume -> RAS 4x4 matrix)."""
    directions = LPS_FROM_RAS @ np.reshape(np.asarray(volume.direction, dtype=float), (3, 3))
    matrix = np.eye(4)
    matrix[:3, :3] = directions * np.asarray(volume.spacing, dtype=float)
    matrix[:3, 3] = LPS_FROM_RAS @ np.asarray(volume.origin, dtype=float)
    return matrix


def set_volume_geometry(node: MRMLNode, volume: Volume) -> None:
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(volume_ijk_to_ras(volume)))


# -- slice views -------------------------------------------------------------------------------
def find_slice_node(scene: MRMLNode, view_name: str) -> MRMLNode:
    """The slice node behind a view ('Red', 'Yellow', 'Green'), found by its layout name."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
        if node.GetLayoutName() == view_name:
            return node
    raise InputError(f"there is no {view_name} slice view in this layout: choose another view "
                     "or switch to a layout that shows it")


def slice_axis_index(slice_node: MRMLNode, volume_node: MRMLNode,
                     tolerance_deg: float = OBLIQUE_TOLERANCE_DEG) -> tuple[int, int]:
    """(numpy axis, slice index) of the volume slice a view shows; oblique views are refused.

    The engine needs original voxel slices; an oblique view would be a resampled image whose
    labels no longer sit on voxels, so it is refused with the way to fix it.
    """
    view = slice_node.GetLayoutName() or slice_node.GetName()
    to_world = ijk_to_world(volume_node)
    slice_to_ras = matrix_to_array(slice_node.GetSliceToRAS())
    normal = slice_to_ras[:3, 2] / np.linalg.norm(slice_to_ras[:3, 2])
    axes = to_world[:3, :3] / np.linalg.norm(to_world[:3, :3], axis=0)
    cosines = np.abs(axes.T @ normal)
    index_axis = int(np.argmax(cosines))
    angle = float(np.degrees(np.arccos(min(1.0, cosines[index_axis]))))
    if angle > tolerance_deg:
        raise InputError(f"the {view} view is oblique to volume '{volume_node.GetName()}' ({angle:.1f} "
                         "degrees from its nearest voxel plane): examples must be original slices. "
                         "Align the view with the volume (slice view pin menu > 'Rotate to volume "
                         "plane') and add the slice again")
    point = np.linalg.inv(to_world) @ np.append(slice_to_ras[:3, 3], 1.0)
    index = int(round(float(point[index_axis])))
    size = volume_node.GetImageData().GetDimensions()[index_axis]
    if not 0 <= index < size:
        raise InputError(f"the {view} view shows a plane outside volume '{volume_node.GetName()}' "
                         f"(slice {index}, valid 0..{size - 1}): scroll into the volume first")
    return 2 - index_axis, index


# Slicer's orientation presets, by the RAS axis closest to the slice normal (0 = R, 1 = A, 2 = S).
_PRESETS = {0: "Sagittal", 1: "Coronal", 2: "Axial"}
_PRESET_MATRIX = {"Sagittal": "GetSagittalSliceToRASMatrix", "Coronal": "GetCoronalSliceToRASMatrix",
                  "Axial": "GetAxialSliceToRASMatrix"}


def view_orientation(volume_node: MRMLNode, axis: int) -> str:
    """'Axial', 'Coronal' or 'Sagittal': the preset whose plane is closest to slices along `axis`."""
    directions = ijk_to_world(volume_node)[:3, :3]
    return _PRESETS[int(np.argmax(np.abs(directions[:, 2 - axis])))]


def show_slice(slice_node: MRMLNode, volume_node: MRMLNode, axis: int, index: int) -> None:
    """Point a view at an example slice in Slicer's standard orientation for that plane.

    The view takes Slicer's own preset (so an axial slice is shown as 'Axial', radiological, with
    the preset's normal), then `RotateToVolumePlane` aligns it with the voxel planes of an oblique
    volume (it keeps the preset when the volume is not oblique), so the slice can be added again.
    """
    name = view_orientation(volume_node, axis)
    if not slice_node.HasSliceOrientationPreset(name):  # a slice node created outside a layout
        matrix = vtk.vtkMatrix3x3()
        getattr(slicer.vtkMRMLSliceNode, _PRESET_MATRIX[name])(matrix)
        slice_node.AddSliceOrientationPreset(name, matrix)
    slice_node.SetOrientation(name)
    slice_node.RotateToVolumePlane(volume_node)
    centre = (np.asarray(volume_node.GetImageData().GetDimensions(), dtype=float) - 1) / 2
    centre[2 - axis] = index
    slice_node.JumpSliceByCentering(*(ijk_to_world(volume_node) @ np.append(centre, 1.0))[:3])


def matching_axis(source: Volume, axis: int, query: Volume) -> int:
    """The query's numpy axis that runs along the same anatomical direction as `axis` of `source`
    (an axial example from another patient propagates axially, whatever the voxel order)."""
    source_dirs = np.reshape(np.asarray(source.direction, dtype=float), (3, 3))
    query_dirs = np.reshape(np.asarray(query.direction, dtype=float), (3, 3))
    world = int(np.argmax(np.abs(source_dirs[:, 2 - axis])))
    return 2 - int(np.argmax(np.abs(query_dirs[world, :])))


# -- segments ----------------------------------------------------------------------------------
def segment_ids_by_name(seg_node: MRMLNode, names: Iterable[str], role: str = "") -> dict[str, str]:
    """Segment ids for names; a missing name is an error that says which node lacks it."""
    segmentation = seg_node.GetSegmentation()
    ids = {}
    for name in names:
        segment_id = segmentation.GetSegmentIdBySegmentName(name)
        if not segment_id:
            where = f" ({role})" if role else ""
            raise InputError(f"segmentation '{seg_node.GetName()}'{where} has no segment named '{name}': "
                             "add it there (it may be empty) or untick it in the segment list")
        ids[name] = segment_id
    return ids


def segment_names(seg_node: MRMLNode) -> list[str]:
    segmentation = seg_node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def segment_color(seg_node: MRMLNode, name: str) -> tuple[float, float, float] | None:
    segment_id = seg_node.GetSegmentation().GetSegmentIdBySegmentName(name)
    return tuple(seg_node.GetSegmentation().GetSegment(segment_id).GetColor()) if segment_id else None


def segment_masks(seg_node: MRMLNode, names: Sequence[str], reference: MRMLNode) -> dict[str, np.ndarray]:
    """Boolean (K, J, I) masks on the reference volume's grid, one per segment name.

    Always exported onto the reference volume: without it Slicer crops to the segments' extent
    and the array would no longer line up with the image. Segments are read one by one, so
    overlapping segments stay separate.
    """
    ids = segment_ids_by_name(seg_node, names)
    with temporary_labelmap(reference) as labelmap:
        return {name: _export_segment(seg_node, ids[name], reference, labelmap, name) for name in names}


def segment_mask(seg_node: MRMLNode, segment_id: str, reference: MRMLNode) -> np.ndarray:
    """One segment, chosen by id (names may repeat), as a (K, J, I) mask on the reference's grid."""
    segment = seg_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise InputError(f"segmentation '{seg_node.GetName()}' has no segment with id '{segment_id}': "
                         "select an existing segment")
    with temporary_labelmap(reference) as labelmap:
        return _export_segment(seg_node, segment_id, reference, labelmap, segment.GetName())


def _export_segment(seg_node, segment_id, reference, labelmap, name) -> np.ndarray:
    logic = slicer.modules.segmentations.logic()
    if not logic.ExportSegmentsToLabelmapNode(seg_node, _string_array([segment_id]), labelmap, reference):
        raise InputError(f"cannot read segment '{name}' of '{seg_node.GetName()}' on the grid of "
                         f"'{reference.GetName()}'")
    return np.asarray(slicer.util.arrayFromVolume(labelmap)) != 0


# -- the segment list of the panel -------------------------------------------------------------
def segment_rows(seg_node: MRMLNode | None, excluded_ids: Iterable[str]) -> list[tuple[str, str, bool]]:
    """(segment id, name, ticked) for each segment, in the segmentation's order.

    Exclusions are kept by segment id, so renaming a segment keeps its tick, and a segment added
    later is ticked by default.
    """
    if seg_node is None:
        return []
    excluded = set(excluded_ids)
    segmentation = seg_node.GetSegmentation()
    rows = []
    for i in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(i)
        rows.append((segment_id, segmentation.GetSegment(segment_id).GetName(), segment_id not in excluded))
    return rows


def ticked_segment_names(seg_node: MRMLNode | None, excluded_ids: Iterable[str]) -> list[str] | None:
    """Names of the ticked segments for a run; None when nothing is excluded (run them all)."""
    rows = segment_rows(seg_node, excluded_ids)
    if all(ticked for _id, _name, ticked in rows):
        return None
    return [name for _id, name, ticked in rows if ticked]


SEGMENT_LIST_EVENTS = ("SegmentAdded", "SegmentRemoved", "SegmentModified")


class SegmentListWatcher:
    """Calls `callback()` whenever segments of the watched segmentation are added, removed,
    renamed or recoloured, so a list built from them never goes stale. The segmentation node
    forwards its segmentation's events, so the node itself is observed (it survives the
    segmentation object being replaced)."""

    def __init__(self, callback) -> None:
        self.callback = callback
        self.node: MRMLNode | None = None
        self._tags: list[int] = []

    def watch(self, node: MRMLNode | None) -> None:
        if node is self.node:
            return
        self.stop()
        self.node = node
        if node is not None:
            self._tags = [node.AddObserver(getattr(slicer.vtkSegmentation, event), self._changed)
                          for event in SEGMENT_LIST_EVENTS]

    def stop(self) -> None:
        if self.node is not None:
            for tag in self._tags:
                self.node.RemoveObserver(tag)
        self.node, self._tags = None, []

    def _changed(self, caller, event) -> None:
        self.callback()


@contextmanager
def temporary_labelmap(reference: MRMLNode):
    """A scratch labelmap on the reference's grid and transform, removed with every helper node
    it gained (display, colour, storage), so reading or writing leaves no trace in the scene."""
    scene = reference.GetScene()
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "MedicalGeneralist scratch")
    node.CopyOrientation(reference)
    node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    try:
        yield node
    finally:
        remove_node(node, keep=before)


def remove_node(node: MRMLNode, keep: set[str] | None = None) -> None:
    """Remove a node with the display, colour and storage nodes it brought along (MRML's
    RemoveNode leaves them behind). Nodes whose ids are in `keep` (or that are shared, such as
    Slicer's default colour tables, when `keep` is None) stay."""
    scene = node.GetScene()
    if scene is None:
        return
    displays = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    helpers = displays + [node.GetStorageNode()]
    if keep is not None:
        helpers += [d.GetColorNode() for d in displays if d is not None and d.GetColorNode() is not None]
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and helper.GetID() not in (keep or ()) and scene.IsNodePresent(helper):
            scene.RemoveNode(helper)


def _string_array(values: Iterable[str]) -> vtk.vtkStringArray:
    array = vtk.vtkStringArray()
    for value in values:
        array.InsertNextValue(value)
    return array


def union_mask(seg_node: MRMLNode, reference: MRMLNode) -> np.ndarray:
    """All segments of a segmentation together (the inpainting mask)."""
    names = segment_names(seg_node)
    if not names:
        raise InputError(f"segmentation '{seg_node.GetName()}' has no segments: paint the region to fill")
    return np.logical_or.reduce(list(segment_masks(seg_node, names, reference).values()))


def overlap_free_groups(names: Sequence[str], slices: Sequence[dict[str, np.ndarray]]) -> list[list[str]]:
    """Split segment names into groups that never overlap on any example slice.

    The engine takes one label per pixel, so overlapping segments (a tumour inside an organ)
    are run in separate groups and come back as separate, still-overlapping segments.
    """
    groups: list[list[str]] = []
    for name in names:
        for group in groups:
            if not any((s[name] & s[other]).any() for s in slices for other in group):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


# -- examples ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExampleSlice:
    """One row of the examples table: a slice of a volume and where its target comes from.

    target: a segmentation node (segment task) or a scalar volume on the same grid as `volume`
    (image tasks: the clean, filled or other-contrast slice).
    """

    volume: MRMLNode
    axis: int
    index: int
    target: MRMLNode


@dataclass
class ExampleGroup:
    """Examples for one engine run; `names[v - 1]` is the segment behind label value v."""

    examples: list[Example]
    names: list[str] = field(default_factory=list)


@dataclass
class GatheredExamples:
    groups: list[ExampleGroup]
    axis: int  # the query's numpy axis to run along
    colors: dict[str, tuple[float, float, float]] = field(default_factory=dict)


def run_axis(entries: Sequence[ExampleSlice], query_node: MRMLNode, query: Volume) -> tuple[int, list[int]]:
    """(numpy axis to run along, labelled slice indices of the query itself).

    All slices of the query must share one axis (propagation runs along it). Without any, the
    axis is the query's axis that matches the first example's anatomical direction.
    """
    if not entries:
        raise InputError("no example slices yet: show a labelled slice in a view and click "
                         "'Add current slice'")
    for n, e in enumerate(entries, 1):
        if e.volume is None or e.target is None:
            raise InputError(f"example {n} refers to a volume or target that was deleted: remove it")
    own = [e for e in entries if e.volume.GetID() == query_node.GetID()]
    axes = sorted({e.axis for e in own})
    if len(axes) > 1:
        raise InputError("the examples on the input volume come from different view directions "
                         f"(numpy axes {axes}): keep the slices of one view (e.g. all axial) and remove the others")
    if own:
        return axes[0], sorted({e.index for e in own})
    first = entries[0]
    return matching_axis(node_to_volume(first.volume, "example volume"), first.axis, query), []


def crop_along(array: np.ndarray, axis: int, lo: int, size: int) -> np.ndarray:
    """Slices lo..lo+size-1 along an axis (the query may be cropped to the range being run)."""
    return np.ascontiguousarray(np.take(array, np.arange(lo, lo + size), axis=axis))


def gather_examples(entries: Sequence[ExampleSlice], query_node: MRMLNode, query: Volume, axis: int,
                    task: str, modality: str, names: Sequence[str] | None = None,
                    offset: int = 0) -> GatheredExamples:
    """Turn recorded example slices into engine Examples.

    Slices of the query volume itself become in-volume examples (propagation starts from them);
    slices of any other volume (another patient, another series) become context pairs only.
    `query` may be the query cropped along `axis` from slice `offset`: the query's own examples
    are then cut the same way, so they share its intensity normalisation and slice numbering.
    """
    _check_entries(entries, task)
    own_id = query_node.GetID()
    cut = lambda key, array: crop_along(array, axis, offset, query.shape[axis]) if key[0] == own_id else array
    volumes = {e.volume.GetID(): node_to_volume(e.volume, "example volume")
               for e in entries if e.volume.GetID() != own_id}
    volumes[own_id] = query
    shift = lambda key, rows: [r.index - offset if key[0] == own_id else r.index for r in rows]
    sources = _by_source(entries)
    if task == "segment":
        names = list(names) if names else segment_names(entries[0].target)
        if not names:
            raise InputError(f"segmentation '{entries[0].target.GetName()}' has no segments: paint "
                             "the structure on the example slices first")
        masks = {key: {n: cut(key, m) for n, m in segment_masks(rows[0].target, names, rows[0].volume).items()}
                 for key, rows in sources.items()}
        slices = _example_slices(sources, masks, names, shift)
        empty = [n for n in names if not any(s[n].any() for s in slices)]
        if empty:
            raise InputError(f"segment(s) {', '.join(repr(n) for n in empty)} are empty on every example slice: "
                             "paint them on at least one example slice, or untick them")
        groups = [ExampleGroup(_label_examples(sources, masks, volumes, group, modality, own_id, shift), group)
                  for group in overlap_free_groups(names, slices)]
        colors = {n: c for e in reversed(entries) for n in names if (c := segment_color(e.target, n))}
        return GatheredExamples(groups, axis, colors)
    examples = []
    for key, rows in sources.items():
        target = cut(key, node_to_volume(rows[0].target, "example target").array)
        image = volumes[key[0]]
        target_volume = image.with_array(target) if target.shape == image.shape else Volume(target)
        check_pair(image, target_volume, f"example target '{rows[0].target.GetName()}'")
        _check_same_grid(rows[0].volume, rows[0].target)
        examples += pairs_from_volumes(image, target_volume, key[1], shift(key, rows), task, modality,
                                       key[0] == own_id)
    return GatheredExamples([ExampleGroup(examples)], axis)


def _check_entries(entries: Sequence[ExampleSlice], task: str) -> None:
    want = "vtkMRMLSegmentationNode" if task == "segment" else "vtkMRMLScalarVolumeNode"
    for n, e in enumerate(entries, 1):
        if e.target is None or not e.target.IsA(want):
            got = e.target.GetClassName() if e.target is not None else "nothing"
            kind = want.replace("vtkMRML", "").replace("Node", "").replace("Scalar", "scalar ").lower()
            raise InputError(f"example {n} has {got} as its target; the {task} task needs a {kind} "
                             "node: remove the example and add it again with the right target")
        if e.axis not in (0, 1, 2):
            raise InputError(f"example {n} has axis {e.axis}: use 0, 1 or 2")


def _check_same_grid(image: MRMLNode, target: MRMLNode) -> None:
    """Image-task pairs must be voxel-aligned: a shifted target would teach a shifted output."""
    if not np.allclose(ijk_to_world(image), ijk_to_world(target), atol=1e-3):
        raise InputError(f"example target '{target.GetName()}' is not on the grid of '{image.GetName()}' "
                         "(origin, spacing or directions differ): register and resample it onto that "
                         "volume first (e.g. Resample Scalar/Vector/DWI Volume)")


def _by_source(entries: Sequence[ExampleSlice]) -> dict[tuple[str, int, str], list[ExampleSlice]]:
    """Entries grouped by (volume, axis, target): each group is read from MRML once."""
    groups: dict[tuple[str, int, str], list[ExampleSlice]] = {}
    for e in entries:
        groups.setdefault((e.volume.GetID(), e.axis, e.target.GetID()), []).append(e)
    return groups


def _example_slices(sources, masks, names, shift) -> list[dict[str, np.ndarray]]:
    return [{n: np.take(masks[key][n], i, axis=key[1]) for n in names}
            for key, rows in sources.items() for i in shift(key, rows)]


def _label_examples(sources, masks, volumes, names, modality, own_id, shift) -> list[Example]:
    """Examples whose target holds label v for names[v - 1] (one overlap-free group)."""
    examples = []
    for key, rows in sources.items():
        image = volumes[key[0]]
        labels = np.zeros(image.shape, np.uint8 if len(names) < 256 else np.uint16)
        for value, name in enumerate(names, 1):
            labels[masks[key][name]] = value
        examples += pairs_from_volumes(image, image.with_array(labels), key[1], shift(key, rows),
                                       "segment", modality, key[0] == own_id)
    return examples


# -- writing results ---------------------------------------------------------------------------
def place_beside(node: MRMLNode, reference: MRMLNode) -> None:
    """Same parent transform and subject-hierarchy folder as the input, so results overlay it."""
    node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    scene = node.GetScene()
    shn = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene) if scene else None
    if shn is None:
        return
    reference_item = shn.GetItemByDataNode(reference)
    if not reference_item:
        return
    parent = shn.GetItemParent(reference_item)
    item = shn.GetItemByDataNode(node)
    if item:
        shn.SetItemParent(item, parent)
    else:
        shn.CreateItem(parent, node)


def unique_segment_name(seg_node: MRMLNode, name: str) -> str:
    """`name`, or `name (2)`, `name (3)`... so an added segment never shadows an existing one."""
    taken = set(segment_names(seg_node))
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name} ({n})"
    return candidate


def new_segmentation_node(reference: MRMLNode, name: str) -> MRMLNode:
    scene = reference.GetScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    node.CreateDefaultDisplayNodes()
    place_beside(node, reference)
    return node


def add_segments(seg_node: MRMLNode, reference: MRMLNode,
                 segments: Sequence[tuple[str, tuple[float, float, float] | None, np.ndarray]],
                 surface: bool = True) -> list[str]:
    """Add (name, colour, mask) segments as NEW segments; existing segments are left as they are.

    Masks are (K, J, I) arrays on the reference volume's grid. Returns the new segment ids.
    surface: also build the 3D surface (results); a preview that is replaced often skips it.
    """
    shape = tuple(reversed(reference.GetImageData().GetDimensions()))
    for _, _, mask in segments:
        if mask.shape != shape:
            raise ValueError(f"mask shape {mask.shape} does not match the reference volume {shape}")
    segmentation = seg_node.GetSegmentation()
    logic = slicer.modules.segmentations.logic()
    added = []
    with temporary_labelmap(reference) as labelmap:
        for name, color, mask in segments:
            segment_id = segmentation.AddEmptySegment("", unique_segment_name(seg_node, name),
                                                      list(color) if color else [0.5, 0.5, 0.5])
            added.append(segment_id)
            if not np.any(mask):
                continue
            slicer.util.updateVolumeFromArray(labelmap, mask.astype(np.uint8))
            if not logic.ImportLabelmapToSegmentationNode(labelmap, seg_node, _string_array([segment_id])):
                raise RuntimeError(f"Slicer could not import segment '{name}'")
    if surface:
        show_in_3d(seg_node)
    return added


def show_in_3d(seg_node: MRMLNode) -> None:
    """Build the closed surface, so the segments also show in the 3D view (as painting does)."""
    seg_node.CreateClosedSurfaceRepresentation()


def new_volume_node(reference: MRMLNode, array: np.ndarray, name: str) -> MRMLNode:
    """A NEW scalar volume with the reference's exact geometry (origin, spacing, directions)."""
    if array.shape != tuple(reversed(reference.GetImageData().GetDimensions())):
        raise ValueError(f"array shape {array.shape} does not match the reference volume")
    scene = reference.GetScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    node.CopyOrientation(reference)
    slicer.util.updateVolumeFromArray(node, array)
    node.CreateDefaultDisplayNodes()
    place_beside(node, reference)
    return node
