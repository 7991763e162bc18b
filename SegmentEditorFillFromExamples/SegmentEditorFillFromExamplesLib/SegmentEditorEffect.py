"""'Fill from examples': the selected segment's painted slices are the examples; the in-context
model fills the rest of the source volume. Initialize shows a preview, Update runs again after
more painting, Apply writes into the selected segment through the editor (undo, masking and
overwrite work as for every effect), Cancel drops the preview.

Only the Qt side is here; the work is MedicalGeneralistLib/effect_logic.py (tested headlessly).
"""

import os

import qt
import slicer
from slicer.i18n import tr as _

from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

DIRECTION_LABELS = {"auto": _("Automatic (the painted view)"), "axial": _("Axial"),
                    "coronal": _("Coronal"), "sagittal": _("Sagittal")}


class _EditorActions:
    """The effect API calls that modify the segmentation (effect_logic.EditorActions)."""

    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect

    def saveStateForUndo(self):
        self.scriptedEffect.saveStateForUndo()

    def modifySelectedSegmentByLabelmap(self, labelmap, mode):
        mode = getattr(slicer.qSlicerSegmentEditorAbstractEffect, "ModificationMode" + mode)
        self.scriptedEffect.modifySelectedSegmentByLabelmap(labelmap, mode)


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Fill the selected segment from its painted slices with the MedicalGeneralist model."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "Fill from examples"  # the effect's key (scripts, saved layouts)
        if hasattr(scriptedEffect, "title"):
            scriptedEffect.title = _("Fill from examples")
        scriptedEffect.perSegment = True  # works on the selected segment
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self._fill = None
        self._running = False
        self._stopRequested = False

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return "<html>" + _("""Fill the selected segment from a few painted slices with an in-context model.<br>
Paint the segment on a few slices of one view (e.g. 3 axial slices across the structure), then
press <b>Initialize</b>. Check the preview; where it is wrong, paint one more slice and press
<b>Update</b>. <b>Apply</b> writes the preview into the segment (Ctrl+Z undoes it; the editable
area, intensity range and overwrite settings apply). The painted slices are kept exactly.""") + "</html>"

    def fill(self):
        """The effect's logic (kept across Initialize/Update: the model stays loaded)."""
        if self._fill is None:
            from MedicalGeneralist import MedicalGeneralistLogic
            from MedicalGeneralistLib import effect_logic, slicer_run

            # the engine runs in the module's warm process (never in Slicer's): a crash or an
            # out-of-memory there is one message, and Slicer stays up
            runner = slicer_run.engine_job_runner(MedicalGeneralistLogic.sharedWorker())
            self._fill = effect_logic.FillFromExamples(runner)
        return self._fill

    # -- options panel --------------------------------------------------------------------------
    def setupOptionsFrame(self):
        self.directionComboBox = qt.QComboBox()
        for key, label in DIRECTION_LABELS.items():
            self.directionComboBox.addItem(label, key)
        self.directionComboBox.setToolTip(_("The view the examples were painted in; automatic picks "
                                            "the direction with the fewest painted slices."))
        self.scriptedEffect.addLabeledOptionsWidget(_("Painted in:"), self.directionComboBox)

        self.previewButton = qt.QPushButton(_("Initialize"))
        self.previewButton.objectName = self.__class__.__name__ + "Preview"
        self.previewButton.setToolTip(_("Fill the other slices from the painted ones and show a preview."))
        self.scriptedEffect.addOptionsWidget(self.previewButton)

        self.progressBar = qt.QProgressBar()
        self.progressBar.hide()
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.progressBar)
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        self.cancelButton = qt.QPushButton(_("Cancel"))
        self.cancelButton.objectName = self.__class__.__name__ + "Cancel"
        self.cancelButton.setToolTip(_("Drop the preview; the segment stays as it is."))
        self.applyButton = qt.QPushButton(_("Apply"))
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        self.applyButton.setToolTip(_("Write the preview into the selected segment."))
        finishFrame = qt.QHBoxLayout()
        finishFrame.addWidget(self.cancelButton)
        finishFrame.addWidget(self.applyButton)
        self.scriptedEffect.addOptionsWidget(finishFrame)

        self.directionComboBox.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)
        self.previewButton.connect("clicked()", self.onPreview)
        self.cancelButton.connect("clicked()", self.onCancel)
        self.applyButton.connect("clicked()", self.onApply)

    def createCursor(self, widget):
        return slicer.util.mainWindow().cursor  # no effect-specific cursor: painting is elsewhere

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("Direction", "auto")

    def _previewNode(self):
        from MedicalGeneralistLib import effect_logic

        node = self.scriptedEffect.parameterSetNode()
        return effect_logic.preview_node(node) if node is not None else None

    def updateGUIFromMRML(self):
        direction = self.scriptedEffect.parameter("Direction") or "auto"
        wasBlocked = self.directionComboBox.blockSignals(True)
        self.directionComboBox.setCurrentIndex(max(0, self.directionComboBox.findData(direction)))
        self.directionComboBox.blockSignals(wasBlocked)
        if self._running:
            return
        hasPreview = self._previewNode() is not None
        self.previewButton.text = _("Update") if hasPreview else _("Initialize")
        self.cancelButton.enabled = hasPreview
        self.applyButton.enabled = hasPreview

    def updateMRMLFromGUI(self):
        self.scriptedEffect.setParameter("Direction", self.directionComboBox.currentData or "auto")

    # -- actions --------------------------------------------------------------------------------
    def onPreview(self):
        """Initialize / Update; while a run is going the button stops it."""
        if self._running:
            self._stopRequested = True
            self.statusLabel.text = _("Stopping...")
            return
        self._running, self._stopRequested = True, False
        self._setRunning(True)
        try:
            with slicer.util.tryWithErrorDisplay(_("Fill from examples failed."), waitCursor=False):
                self._ensureDependencies()
                node = self.fill().preview(self.scriptedEffect.parameterSetNode(),
                                           self.scriptedEffect.parameter("Direction") or "auto",
                                           progress=self._progress, cancel=lambda: self._stopRequested)
                self.statusLabel.text = (_("Stopped: nothing was changed.") if node is None else
                                         _("Preview ready: Apply writes it into the segment."))
        finally:
            self._running = False
            self._setRunning(False)

    @staticmethod
    def _ensureDependencies():
        """The engine needs torch and a few packages: the MedicalGeneralist module installs them
        (after asking)."""
        import MedicalGeneralist

        if MedicalGeneralist.missingDependencies():
            MedicalGeneralist.ensureDependencies(askConfirmation=True)

    def _progress(self, fraction, message):
        self.progressBar.value = int(100 * fraction)
        self.statusLabel.text = message
        slicer.app.processEvents()  # keeps the panel (and the Stop button) responsive

    def _setRunning(self, running):
        self.progressBar.setVisible(running)
        self.progressBar.value = 0
        self.previewButton.text = _("Stop") if running else self.previewButton.text
        for widget in (self.cancelButton, self.applyButton, self.directionComboBox):
            widget.enabled = not running
        if not running:
            self.updateGUIFromMRML()

    def onApply(self):
        with slicer.util.tryWithErrorDisplay(_("Could not apply the preview."), waitCursor=True):
            self.fill().apply(self.scriptedEffect.parameterSetNode(), _EditorActions(self.scriptedEffect))
            self.statusLabel.text = _("Applied (Ctrl+Z undoes it).")
        self.updateGUIFromMRML()

    def onCancel(self):
        self.fill().cancel(self.scriptedEffect.parameterSetNode())
        self.statusLabel.text = ""
        self.updateGUIFromMRML()
