"""Registers the 'Fill from examples' effect in the Segment Editor (a hidden module).

Paint the selected segment on a few slices, press Initialize: the in-context model fills the other
slices of the source volume; check the preview, paint one more slice where it is wrong, press
Update, then Apply (Ctrl+Z undoes it). The effect itself is SegmentEditorFillFromExamplesLib/
SegmentEditorEffect.py; its Qt-free work is MedicalGeneralistLib/effect_logic.py.
"""

import os

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest


class SegmentEditorFillFromExamples(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Segment Editor Fill from examples")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["MedicalGeneralist contributors"]
        self.parent.hidden = True
        self.parent.helpText = _("This hidden module registers the 'Fill from examples' Segment Editor effect "
                                 "of the MedicalGeneralist extension.")
        self.parent.acknowledgementText = _("Part of the MedicalGeneralist extension (see its module).")
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as qSlicerSegmentationsEditorEffects

        instance = qSlicerSegmentationsEditorEffects.qSlicerSegmentEditorScriptedEffect(None)
        effectFilename = os.path.join(os.path.dirname(__file__), self.__class__.__name__ + "Lib/SegmentEditorEffect.py")
        instance.setPythonSource(effectFilename.replace("\\", "/"))
        instance.self().register()


class SegmentEditorFillFromExamplesTest(ScriptedLoadableModuleTest):
    """In the Slicer application: the effect in a real Segment Editor on the bundled sample.

    The engine part (the model on the whole volume) is off by default, as for peers' heavy tests:
    set MEDGEN_SLICER_HEAVY_TESTS=1 to run it.
    """

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_EffectIsRegisteredAndRefusesAnEmptySegment()
        if os.environ.get("MEDGEN_SLICER_HEAVY_TESTS") == "1":
            self.setUp()
            self.test_FillFromThreePaintedSlices()

    def _editor(self):
        from medgen.io.weights import resources_root

        root = resources_root() / "SampleData"
        volume = slicer.util.loadVolume(str(root / "mni152_t1_2mm.nii.gz"))
        labels = slicer.util.loadLabelVolume(str(root / "mni152_tissue_2mm.nii.gz"))
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentId = segmentation.GetSegmentation().AddEmptySegment("", "white matter")
        widget = slicer.qMRMLSegmentEditorWidget()
        widget.setMRMLScene(slicer.mrmlScene)
        editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        widget.setMRMLSegmentEditorNode(editorNode)
        widget.setSegmentationNode(segmentation)
        widget.setSourceVolumeNode(volume)
        editorNode.SetSelectedSegmentID(segmentId)
        return widget, volume, labels, segmentation, segmentId

    def test_EffectIsRegisteredAndRefusesAnEmptySegment(self):
        self.delayDisplay("Fill from examples is in the Segment Editor")
        widget, volume, labels, segmentation, segmentId = self._editor()
        widget.setActiveEffectByName("Fill from examples")
        effect = widget.activeEffect()
        self.assertIsNotNone(effect)
        from medgen.core.errors import InputError

        with self.assertRaises(InputError):
            effect.self().fill().preview(widget.mrmlSegmentEditorNode())
        self.delayDisplay("Test passed")

    def test_FillFromThreePaintedSlices(self):
        self.delayDisplay("Fill from examples: white matter from three axial slices")
        import numpy as np

        widget, volume, labels, segmentation, segmentId = self._editor()
        truth = slicer.util.arrayFromVolume(labels) == 2
        painted = np.zeros_like(truth)
        painted[[30, 38, 46]] = truth[[30, 38, 46]]
        slicer.util.updateSegmentBinaryLabelmapFromArray(painted.astype(np.uint8), segmentation, segmentId, volume)
        widget.setActiveEffectByName("Fill from examples")
        effect = widget.activeEffect().self()
        effect.onPreview()
        effect.onApply()
        result = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume) != 0
        self.assertTrue(np.array_equal(result[38], truth[38]))
        self.assertTrue(result[31:38].any() and result[39:46].any())
        widget.undo()
        result = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume) != 0
        self.assertTrue(np.array_equal(result, painted))
        self.delayDisplay("Test passed")
