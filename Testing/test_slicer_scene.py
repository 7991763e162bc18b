"""A headless MRML scene from the `slicer-core` wheel, shared by the test_slicer_* files.

Real MRML classes, real module logics (volumes, segmentations, subject hierarchy, colours) and
Slicer's own `slicer.util` array helpers; only `slicer.app` and the GUI are absent. The other
test_slicer_* files import the fixtures from here. Skipped where slicer-core is not installed,
so the engine suite still runs without it.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)
import slicer.util  # noqa: E402
import vtk  # noqa: E402

vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
vtk.vtkObject.GlobalWarningDisplayOff()

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "MedicalGeneralist" / "medgen" / "resources" / "SampleData"
T1 = SAMPLE / "mni152_t1_2mm.nii.gz"
TISSUE = SAMPLE / "mni152_tissue_2mm.nii.gz"
TISSUE_NAMES = {1: "grey matter", 2: "white matter"}
LOGICS = {
    "subjecthierarchy": "vtkSlicerSubjectHierarchyModuleLogic",
    "volumes": "vtkSlicerVolumesLogic",
    "segmentations": "vtkSlicerSegmentationsModuleLogic",  # needed before any segment exists
}


class Scene(SimpleNamespace):
    """The scene plus the helpers tests use to load data the way Slicer does."""

    def load_volume(self, path: Path, name: str, labelmap: bool = False):
        """Read a file through a volume archetype storage node (Slicer's own reader)."""
        cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
        node = self.scene.AddNewNodeByClass(cls, name)
        storage = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        assert storage.ReadData(node), f"cannot read {path}"
        node.SetAndObserveStorageNodeID(storage.GetID())
        return node

    def add_volume(self, array: np.ndarray, ijk_to_ras: np.ndarray | None = None, name: str = "volume"):
        node = slicer.util.addVolumeFromArray(array, ijk_to_ras, name)
        return node

    def tissue_segmentation(self, reference, name: str = "tissue"):
        """The template's tissue labels as a segmentation node with named segments."""
        labels = self.load_volume(TISSUE, name + " labels", labelmap=True)
        seg = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        seg.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        seg.CreateDefaultDisplayNodes()
        assert self.logics["segmentations"].ImportLabelmapToSegmentationNode(labels, seg)
        segmentation = seg.GetSegmentation()
        for i, (value, segment_name) in enumerate(sorted(TISSUE_NAMES.items())):
            segment = segmentation.GetNthSegment(i)
            segment.SetName(segment_name)
            segment.SetColor([0.9, 0.6, 0.2] if value == 1 else [0.3, 0.5, 0.9])
        self.scene.RemoveNode(labels)
        return seg

    def slice_node(self, view: str = "Red"):
        node = self.scene.AddNewNodeByClass("vtkMRMLSliceNode", view)
        node.SetLayoutName(view)
        return node

    def snapshot(self) -> dict:
        """What a cancelled run must not change: node ids, voxels and segment masks."""
        ids = [self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())]
        arrays = {}
        for node_id in ids:
            node = self.scene.GetNodeByID(node_id)
            if node.IsA("vtkMRMLVolumeNode") and node.GetImageData() is not None:
                voxels = slicer.util.arrayFromVolume(node)
                arrays[node_id] = (voxels.shape, str(voxels.dtype), voxels.tobytes())
            if node.IsA("vtkMRMLSegmentationNode"):
                segmentation = node.GetSegmentation()
                for k in range(segmentation.GetNumberOfSegments()):
                    sid = segmentation.GetNthSegmentID(k)
                    image = segmentation.GetSegment(sid).GetRepresentation("Binary labelmap")
                    arrays[f"{node_id}/{sid}"] = vtk_image_bytes(image)
        return {"ids": ids, "arrays": arrays}


def vtk_image_bytes(image) -> tuple:
    """Exact content and geometry of a segment's stored labelmap (shared layers included)."""
    from vtk.util.numpy_support import vtk_to_numpy

    scalars = image.GetPointData().GetScalars()
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return (tuple(image.GetExtent()), tuple(matrix.GetElement(r, c) for r in range(4) for c in range(4)),
            vtk_to_numpy(scalars).tobytes() if scalars is not None else b"")


def make_scene() -> Scene:
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    logics = {}
    for name, cls in LOGICS.items():
        logic = getattr(slicer, cls)()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, logic)
        logics[name] = logic
    return Scene(scene=scene, app=app, logics=logics)


@pytest.fixture
def mrml(monkeypatch: pytest.MonkeyPatch) -> Scene:
    """A fresh scene installed as `slicer.mrmlScene`, with `slicer.modules.<name>.logic()`."""
    s = make_scene()
    monkeypatch.setattr(slicer, "mrmlScene", s.scene, raising=False)
    modules = SimpleNamespace(**{k: SimpleNamespace(logic=(lambda logic=v: logic)) for k, v in s.logics.items()})
    monkeypatch.setattr(slicer, "modules", modules, raising=False)
    return s


def oblique_ijk_to_ras(spacing=(1.5, 2.0, 2.5), degrees=(25.0, -10.0, 40.0), origin=(-30.0, 12.5, 7.0)) -> np.ndarray:
    """A rotated, anisotropic, shifted IJK-to-RAS matrix: nothing lines up by accident."""
    ax, ay, az = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


def test_headless_scene_has_working_slicer_util(mrml: Scene) -> None:
    node = mrml.add_volume(np.arange(24, dtype=np.int16).reshape(2, 3, 4), oblique_ijk_to_ras())
    assert slicer.util.arrayFromVolume(node).shape == (2, 3, 4)
    seg = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    sid = seg.GetSegmentation().AddEmptySegment("", "a")
    mask = np.zeros((2, 3, 4), np.uint8)
    mask[1, 1:, 2:] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, sid, node)
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, node), mask)
