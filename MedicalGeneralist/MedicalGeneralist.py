"""MedicalGeneralist: propagate a few labelled slices through a volume, or denoise, inpaint and
synthesize from example pairs, with an in-context image-to-image model, inside 3D Slicer.

The work is split so that the GUI never freezes and never loses the user's data: the Widget
records example slices and reads the scene (main thread); the engine runs in a separate process
started with Slicer's own Python (`PythonSlicer`), kept warm between runs, fed through files and
followed by a non-blocking poll; results are written as NEW nodes or NEW segments on the main
thread only after the engine finished. Cancel kills that process; its crash is one message.
torch is never imported into Slicer's process. The MRML <-> numpy code and the process client
live in MedicalGeneralistLib/ (slicer_io, slicer_run, worker_client, dependencies), tested
headlessly with pytest.
"""

import logging
import os
import shutil
import time
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Default, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from MedicalGeneralistLib import dependencies  # standard library only: safe before any install

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
ANATOMICAL = {0: _("sagittal"), 1: _("coronal"), 2: _("axial")}
# What the choice combo boxes show for the parameter node's keys (the connector fills them with
# the keys, in the Choice order; the labels replace the texts by position, the keys stay stored).
CHOICE_LABELS = {
    "task": {"segment": _("Segment (propagate labels)"), "denoise": _("Denoise"),
             "inpaint": _("Inpaint (fill a region)"), "synthesize": _("Synthesize a contrast")},
    "modality": {"auto": _("Automatic"), "ct": _("CT"), "mr": _("MRI"), "xray": _("X-ray"),
                 "us": _("Ultrasound"), "other": _("Other")},
    "device": {"auto": _("Automatic (GPU if available)"), "cuda": _("GPU (CUDA)"), "cpu": _("CPU")},
    "view": {"Red": _("Red view"), "Yellow": _("Yellow view"), "Green": _("Green view")},
    "rangeMode": {"whole": _("Whole volume"), "between": _("Between the labelled slices"),
                  "around": _("Around the labelled slices")},
    "propagationMode": {"auto": _("Automatic"), "propagate": _("Slice by slice from the labelled slices"),
                        "independent": _("Each slice from the examples alone")},
}

LOG_LINES = 500  # kept in the log panel


#
# MedicalGeneralist
#


class MedicalGeneralist(ScriptedLoadableModule):
    """Module metadata; see the widget for the workflow."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Medical Generalist")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedicalGeneralist contributors"]
        self.parent.helpText = _("""
Label a few slices, and an in-context model does the rest of the volume: propagate segments from
example slices (of this volume, or of another patient), or denoise, inpaint and synthesize a
contrast from example pairs. Pick the examples with <b>Add current slice</b> in the Red, Yellow or
Green view, choose the segments and press <b>Run</b>. Results always go to a new segmentation or
volume, or to new segments of a chosen segmentation: nothing you drew is overwritten.
See the <a href="https://github.com/medicalgeneralist/SlicerMedicalGeneralist">documentation</a>.
Research software: not for clinical use.
""")
        self.parent.acknowledgementText = _("""
Developed by the MedicalGeneralist contributors. Built on PyTorch and MONAI. The sample data is
derived from the MNI ICBM152 2009a template (Fonov et al., NeuroImage 2011; Copyright (C)
1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute).
""")


#
# MedicalGeneralistParameterNode
#


@parameterNodeWrapper
class MedicalGeneralistParameterNode:
    """The panel's state, saved with the scene.

    examples: (volume, numpy axis, slice index, target node) per row of the examples table.
    excludedSegments: ids of the segments left unticked (ids, so a renamed segment keeps its
        tick; segments added later are included by default).
    model: a registry id ("" for the default) or "local" for modelPath.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    task: Annotated[str, Choice(["segment", "denoise", "inpaint", "synthesize"]), Default("segment")]
    modality: Annotated[str, Choice(["auto", "ct", "mr", "xray", "us", "other"]), Default("auto")]
    model: str
    modelPath: str
    device: Annotated[str, Choice(["auto", "cuda", "cpu"]), Default("auto")]
    view: Annotated[str, Choice(["Red", "Yellow", "Green"]), Default("Red")]
    exampleSegmentation: vtkMRMLSegmentationNode
    exampleTargetVolume: vtkMRMLScalarVolumeNode
    examples: list[tuple[vtkMRMLScalarVolumeNode, int, int, vtkMRMLNode]]
    excludedSegments: list[str]
    maskSegmentation: vtkMRMLSegmentationNode
    rangeMode: Annotated[str, Choice(["whole", "between", "around"]), Default("whole")]
    rangeSlices: Annotated[int, WithinRange(0, 500), Default(10)]
    propagationMode: Annotated[str, Choice(["auto", "propagate", "independent"]), Default("auto")]
    adaptSteps: Annotated[int, WithinRange(-1, 500), Default(-1)]  # -1: "auto", the engine's default
    outputSegmentation: vtkMRMLSegmentationNode


#
# Dependencies
#


def missingDependencies() -> list[str]:
    """Import names that are missing ('torch' also when too old); never raises, imports nothing."""
    return dependencies.missing()


def ensureDependencies(askConfirmation: bool = True) -> None:
    """Install what is missing, once, on the main thread, after the user agreed.

    torch comes from the PyTorch extension, which picks the CUDA build that matches the driver;
    the rest from pip, never touching Slicer's numpy, SimpleITK or vtk, nor adding pip's itk.
    Raises with a message that says what to do when something stays missing.
    """
    missing = missingDependencies()
    if not missing:
        return
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("Medical Generalist needs these Python packages, which are not installed yet: {names}. "
              "Download and install them now (a few minutes; PyTorch comes from the PyTorch extension)?")
            .format(names=", ".join(missing))):
        raise RuntimeError(_("The Python packages were not installed, so the model cannot run."))
    torchProblem = dependencies.torch_problem()
    if torchProblem:
        _installTorch(torchProblem)
    requirements = dependencies.missing_requirements()
    if requirements:
        _pipInstall(requirements)
    still = missingDependencies()
    if still:
        raise RuntimeError(_("These Python packages are still missing: {names}. Install them from the "
                             "Python console, e.g. slicer.util.pip_install('{reqs}'), then restart Slicer.")
                           .format(names=", ".join(still),
                                   reqs=" ".join(r for r, _m in dependencies.PIP_REQUIREMENTS)))


def _installTorch(problem: str) -> None:
    """Through PyTorchUtils, with the version requirement (the user already agreed)."""
    try:
        import PyTorchUtils
    except ImportError as error:
        raise RuntimeError(_("{problem}: install the 'PyTorch' extension from the Extensions Manager, "
                             "restart Slicer and try again.").format(problem=problem)) from error
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=dependencies.TORCH_REQUIREMENT) is None:
        raise RuntimeError(_("{problem} and it was not installed: install it from the PyTorch Util module "
                             "(version {req}), then run again.").format(problem=problem, req=dependencies.TORCH_REQUIREMENT))


def _pipInstall(requirements: list[str]) -> None:
    """slicer.pydeps.pip_ensure where it exists (Slicer 5.11+), else slicer.util.pip_install."""
    try:
        from slicer import pydeps
    except ImportError:
        pydeps = None
    if pydeps is not None and hasattr(pydeps, "pip_ensure"):
        from packaging.requirements import Requirement

        pydeps.pip_ensure([Requirement(r) for r in requirements], requester="MedicalGeneralist",
                          skip_packages=dependencies.PROTECTED_PACKAGES)
        return
    noDeps = [r for r in requirements if r.startswith(dependencies.NO_DEPS)]
    if noDeps:
        slicer.util.pip_install(" ".join(noDeps) + " --no-deps")
    rest = [r for r in requirements if r not in noDeps]
    if rest:
        slicer.util.pip_install(" ".join(rest))


#
# MedicalGeneralistWidget
#


class MedicalGeneralistWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: examples table, options, Run/Cancel and progress; polls the worker with a timer."""

    LOCAL_MODEL = "local"

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None  # the WorkerJob in flight
        self._prepared = None  # its scene snapshot (what `write` needs)
        self._updating = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedicalGeneralist.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedicalGeneralistLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self.onPoll)

        self.ui.examplesTableWidget.setHorizontalHeaderLabels([_("Volume"), _("Direction"), _("Slice"), _("Target")])
        self.ui.examplesTableWidget.horizontalHeader().setStretchLastSection(True)
        self.ui.progressBar.hide()
        self._addLogPanel()
        self._fillModelComboBox()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.addExampleButton.connect("clicked(bool)", self.onAddExample)
        self.ui.removeExampleButton.connect("clicked(bool)", self.onRemoveExample)
        self.ui.clearExamplesButton.connect("clicked(bool)", self.onClearExamples)
        self.ui.jumpToExampleButton.connect("clicked(bool)", self.onJumpToExample)
        self.ui.examplesTableWidget.connect("cellDoubleClicked(int,int)", lambda row, column: self.onJumpToExample())
        self.ui.segmentsListWidget.connect("itemChanged(QListWidgetItem*)", self.onSegmentTicked)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the module is unloaded or Slicer closes: stop the timer, the run and the
        engine process (which frees its GPU memory), drop observers."""
        if getattr(self, "_timer", None) is not None:
            self._timer.stop()
        self._cancelJob()
        if self.logic is not None:
            self.logic.shutdown()
        self.removeObservers()
        if getattr(self, "_watcher", None) is not None:
            self._watcher.stop()

    def _addLogPanel(self) -> None:
        """A collapsed 'Log' section under the status line: what the engine process reports."""
        import ctk

        box = ctk.ctkCollapsibleButton()
        box.text = _("Log")
        box.collapsed = True
        self.logTextEdit = qt.QPlainTextEdit()
        self.logTextEdit.readOnly = True
        self.logTextEdit.setMaximumBlockCount(LOG_LINES)
        qt.QVBoxLayout(box).addWidget(self.logTextEdit)
        self.layout.addWidget(box)

    def _log(self, lines) -> None:
        for line in lines:
            self.logTextEdit.appendPlainText(line)
            logging.info(f"MedicalGeneralist: {line}")

    def enter(self) -> None:
        self.initializeParameterNode()
        self._startEngineEarly()

    def _startEngineEarly(self) -> None:
        """Start the engine process while the user picks examples, so that the first Run finds
        its imports done (it ends itself after a long idle time)."""
        if missingDependencies():
            return  # installed on the first Run, after the user agrees
        try:
            self.logic.worker().start()
        except Exception as error:  # the first Run reports it properly
            logging.info(f"MedicalGeneralist: engine process not started early ({error})")

    def exit(self) -> None:
        self.setParameterNode(None)  # a running job keeps running; its result is still written

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node ------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode: Optional[MedicalGeneralistParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._labelChoiceComboBoxes()
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    def _labelChoiceComboBoxes(self) -> None:
        """Readable texts in the combo boxes bound to Choice fields (connectGui fills in the keys)."""
        for widget in vars(self.ui).values():
            parameter = widget.property("SlicerParameterName") if isinstance(widget, qt.QComboBox) else None
            for index in range(widget.count) if parameter in CHOICE_LABELS else ():
                key = widget.itemText(index)
                widget.setItemText(index, CHOICE_LABELS[parameter].get(key, key))

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        """Everything the bindings cannot do: table, segment list, task-specific rows, warnings."""
        p = self._parameterNode
        if p is None or self._updating:
            return
        self._updating = True
        try:
            self._showTaskRows(p.task)
            self._fillExamplesTable(p)
            self._fillSegmentsList(p)
            self._selectModel(p)
            self._updateDeviceWarning(p.device)
            self._updateApplyButton(p)
        finally:
            self._updating = False

    def _showTaskRows(self, task: str) -> None:
        segment, inpaint = task == "segment", task == "inpaint"
        for name in ("exampleSegmentationLabel", "exampleSegmentationSelector", "segmentsLabel",
                     "segmentsListWidget", "outputSegmentationLabel", "outputSegmentationSelector",
                     "propagationModeLabel", "propagationModeComboBox"):
            getattr(self.ui, name).setVisible(segment)
        for name in ("exampleTargetVolumeLabel", "exampleTargetVolumeSelector", "outputVolumeLabel"):
            getattr(self.ui, name).setVisible(not segment)
        for name in ("maskSegmentationLabel", "maskSegmentationSelector"):
            getattr(self.ui, name).setVisible(inpaint)

    def _fillExamplesTable(self, p) -> None:
        table = self.ui.examplesTableWidget
        table.setRowCount(len(p.examples))
        for row, (volume, axis, index, target) in enumerate(p.examples):
            cells = [volume.GetName() if volume else _("(deleted)"), self._directionName(volume, axis),
                     str(index), target.GetName() if target else _("(deleted)")]
            for column, text in enumerate(cells):
                table.setItem(row, column, qt.QTableWidgetItem(text))

    @staticmethod
    def _directionName(volume, axis: int) -> str:
        """'axial' etc. from the volume's geometry, so rows read the way the user thinks."""
        if volume is None:
            return str(axis)
        from MedicalGeneralistLib import slicer_io

        try:
            directions = slicer_io.ijk_to_world(volume)[:3, :3]
        except Exception:  # e.g. a non-linear transform: the run will explain it
            return str(axis)
        return ANATOMICAL[int(abs(directions[:, 2 - axis]).argmax())]

    @staticmethod
    def _segmentSource(p):
        """Segments are listed from the first example's labels (what the run reads first)."""
        return MedicalGeneralistLogic.segmentSource(p) or p.exampleSegmentation

    def _fillSegmentsList(self, p) -> None:
        """One checkable row per segment (id in the item's data); kept current by a watcher on
        the listed segmentation, so added, removed or renamed segments show at once."""
        from MedicalGeneralistLib import slicer_io

        listWidget = self.ui.segmentsListWidget
        wasBlocked = listWidget.blockSignals(True)
        listWidget.clear()
        source = self._segmentSource(p)
        self._segmentWatcher().watch(source)
        for segmentId, name, ticked in slicer_io.segment_rows(source, p.excludedSegments):
            item = qt.QListWidgetItem(name)
            item.setData(qt.Qt.UserRole, segmentId)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked if ticked else qt.Qt.Unchecked)
            listWidget.addItem(item)
        listWidget.blockSignals(wasBlocked)

    def _segmentWatcher(self):
        if getattr(self, "_watcher", None) is None:
            from MedicalGeneralistLib import slicer_io

            self._watcher = slicer_io.SegmentListWatcher(self._onSegmentsChanged)
        return self._watcher

    def _onSegmentsChanged(self) -> None:
        if self._parameterNode is not None and not self._updating:
            self._updating = True
            try:
                self._fillSegmentsList(self._parameterNode)
            finally:
                self._updating = False

    def onSegmentTicked(self, item) -> None:
        if self._updating or self._parameterNode is None:
            return
        listWidget = self.ui.segmentsListWidget
        items = [listWidget.item(i) for i in range(listWidget.count)]
        self._parameterNode.excludedSegments = [i.data(qt.Qt.UserRole) for i in items
                                                if i.checkState() != qt.Qt.Checked]

    def _updateApplyButton(self, p) -> None:
        if self._run is not None:
            return
        problem = None
        if not p.inputVolume:
            problem = _("Select an input volume.")
        elif p.task == "inpaint" and not p.maskSegmentation:
            problem = _("Select the segmentation that marks the region to fill.")
        elif p.task != "inpaint" and not p.examples:
            problem = _("Add at least one example slice.")
        self.ui.applyButton.enabled = problem is None
        self.ui.applyButton.toolTip = problem or _("Run the task; turns into Cancel while running.")

    # -- model and device ----------------------------------------------------------------------
    def _fillModelComboBox(self) -> None:
        combo = self.ui.modelComboBox
        combo.clear()
        try:
            from medgen.io import weights  # no torch; jsonschema may be missing before setup

            for entry in weights.list_models():
                state = "" if entry.get("available") else _(" (downloads on first use)")
                combo.addItem(f"{entry.get('title', entry['id'])}{state}", "" if entry.get("default") else entry["id"])
        except Exception as error:  # missing torch or registry: the default model still works
            logging.info(f"MedicalGeneralist: model list unavailable ({error})")
            combo.addItem(_("Bundled default model"), "")
        combo.addItem(_("Local checkpoint file..."), self.LOCAL_MODEL)

    def _selectModel(self, p) -> None:
        combo = self.ui.modelComboBox
        index = combo.findData(p.model)
        combo.setCurrentIndex(index if index >= 0 else 0)
        local = combo.itemData(combo.currentIndex) == self.LOCAL_MODEL
        self.ui.modelPathLabel.setVisible(local)
        self.ui.modelPathLineEdit.setVisible(local)
        if self.ui.modelPathLineEdit.currentPath != p.modelPath:
            self.ui.modelPathLineEdit.currentPath = p.modelPath

    def onModelChanged(self, index: int) -> None:
        if not self._updating and self._parameterNode is not None:
            self._parameterNode.model = self.ui.modelComboBox.itemData(index) or ""

    def onModelPathChanged(self, path: str) -> None:
        if not self._updating and self._parameterNode is not None:
            self._parameterNode.modelPath = path

    def _updateDeviceWarning(self, device: str) -> None:
        """A visible line whenever the run will be on the CPU (or cannot use the chosen GPU).

        What the GPU can do is learnt from the engine process when it starts (torch is never
        imported into Slicer's own process); before that only a missing PyTorch is reported.
        """
        info = self.logic.engineInfo() if self.logic else {}
        label = self.ui.deviceWarningLabel
        if dependencies.torch_problem():
            text = _("{problem}: it is installed (through the PyTorch extension) on the first Run, "
                     "after you agree.").format(problem=dependencies.torch_problem())
        elif not info:
            text = _("Running on the CPU: expect seconds per slice.") if device == "cpu" else ""
        elif device == "cuda" and not info.get("cuda"):
            text = _("<b>CUDA was selected but this PyTorch has no usable GPU</b>: the run will fail. "
                     "Choose auto or CPU, or install a CUDA build with the PyTorch Util module.")
        elif device == "cpu" or not (info.get("cuda") or info.get("mps")):
            text = _("Running on the <b>CPU</b>: expect seconds per slice.")
            if device == "auto":
                text += " " + _("No GPU was found; a CUDA build of PyTorch (PyTorch Util module) would be faster.")
        else:
            text = ""
        label.text = text
        label.setVisible(bool(text))

    # -- examples ------------------------------------------------------------------------------
    def _sliceWidget(self):
        view = self._parameterNode.view
        sliceWidget = slicer.app.layoutManager().sliceWidget(view)
        if sliceWidget is None:
            raise ValueError(_("There is no {view} view in the current layout: choose another view or layout.").format(view=view))
        return sliceWidget

    def onAddExample(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not add the example slice."), waitCursor=True):
            p = self._parameterNode
            sliceWidget = self._sliceWidget()
            volume = self._backgroundVolume(sliceWidget) or p.inputVolume
            target = p.exampleSegmentation if p.task == "segment" else p.exampleTargetVolume
            if target is None:
                raise ValueError(_("Choose the example labels (segment task) or the example target volume first."))
            entry = self.logic.exampleFromView(sliceWidget.mrmlSliceNode(), volume, target)
            if any(tuple(e) == entry for e in p.examples):
                raise ValueError(_("This slice is already an example."))
            p.examples.append(entry)

    @staticmethod
    def _backgroundVolume(sliceWidget):
        volumeId = sliceWidget.sliceLogic().GetSliceCompositeNode().GetBackgroundVolumeID()
        node = slicer.mrmlScene.GetNodeByID(volumeId) if volumeId else None
        return node if node is not None and node.IsA("vtkMRMLScalarVolumeNode") else None

    def _selectedRow(self) -> int:
        row = self.ui.examplesTableWidget.currentRow()
        if row < 0 or row >= len(self._parameterNode.examples):
            raise ValueError(_("Select an example in the table first."))
        return row

    def onRemoveExample(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not remove the example.")):
            del self._parameterNode.examples[self._selectedRow()]

    def onClearExamples(self) -> None:
        self._parameterNode.examples = []

    def onJumpToExample(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not show the example slice.")):
            volume, axis, index, target = self._parameterNode.examples[self._selectedRow()]
            sliceWidget = self._sliceWidget()
            sliceWidget.sliceLogic().GetSliceCompositeNode().SetBackgroundVolumeID(volume.GetID())
            from MedicalGeneralistLib import slicer_io

            slicer_io.show_slice(sliceWidget.mrmlSliceNode(), volume, axis, index)

    # -- running -------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        """Run, or cancel the running job (the button is Cancel while a job runs)."""
        if self._run is not None:
            self._cancelJob()
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start the run."), waitCursor=True):
            if missingDependencies():
                ensureDependencies(askConfirmation=True)
                self._fillModelComboBox()
            request = self.logic.requestFromParameterNode(self._parameterNode)
            self._prepared, self._run = self.logic.startRun(request)
            self._setRunning(True)
            self.ui.statusLabel.text = self._run.message
            self._timer.start()

    def _cancelJob(self) -> None:
        """Kill the engine process now; the scene is left exactly as it was."""
        if self._run is None:
            return
        self._run.cancel()
        self.onPoll()

    def _setRunning(self, running: bool) -> None:
        for name in ("inputsCollapsibleButton", "examplesCollapsibleButton", "optionsCollapsibleButton",
                     "outputCollapsibleButton"):
            getattr(self.ui, name).enabled = not running
        self.ui.applyButton.text = _("Cancel") if running else _("Run")
        self.ui.applyButton.enabled = True
        self.ui.progressBar.setVisible(running)
        self.ui.progressBar.value = 0
        if not running and self._parameterNode is not None:
            self._updateApplyButton(self._parameterNode)

    def onPoll(self) -> None:
        """Timer tick: read what the engine said (never waits); write the result once it is done."""
        run = self._run
        if run is None:
            self._timer.stop()
            return
        finished = run.poll()
        self._log(run.take_log())
        self.ui.progressBar.value = int(100 * run.fraction)
        self.ui.statusLabel.text = run.message
        if not finished:
            return
        self._timer.stop()
        prepared, self._run, self._prepared = self._prepared, None, None
        self._setRunning(False)
        if self._parameterNode is not None:
            self._updateDeviceWarning(self._parameterNode.device)
        self._finish(prepared, run)

    def _finish(self, prepared, run) -> None:
        from MedicalGeneralistLib import slicer_run

        if run.state == "cancelled":
            run.discard()
            self.ui.statusLabel.text = _("Cancelled: nothing was changed.")
            return
        if run.state == "failed":
            run.discard()
            self.ui.statusLabel.text = _("Failed: nothing was written.")
            error = run.error
            slicer.util.errorDisplay(str(error), detailedText=error.details or None)
            return
        with slicer.util.tryWithErrorDisplay(_("Could not write the result."), waitCursor=True):
            node = slicer_run.finish(prepared, run)
            self._show(node)
            seconds = run.seconds.get("total")
            estimates = slicer_run.report_lines(prepared, run)
            self.ui.statusLabel.text = _("Done in {seconds:.1f} s: results are in '{name}'.").format(
                seconds=seconds or 0.0, name=node.GetName()) + "".join("\n" + line for line in estimates)
            self._log(estimates)

    @staticmethod
    def _show(node) -> None:
        if node.IsA("vtkMRMLSegmentationNode"):
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetVisibility(True)
        else:
            slicer.util.setSliceViewerLayers(foreground=node, foregroundOpacity=0.5)


#
# MedicalGeneralistLogic
#


class MedicalGeneralistLogic(ScriptedLoadableModuleLogic):
    """Computation without GUI: scripts and tests call `process` (blocking); the widget uses
    `startRun`, polls the returned job from a timer and writes through `slicer_run.finish`.

    The engine runs in its own process (see `worker`); this process never imports torch.
    """

    _shared_worker = None  # one warm engine process per Slicer session: the module and the effect share it

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return MedicalGeneralistParameterNode(super().getParameterNode())

    @staticmethod
    def exampleFromView(sliceNode, volume, target) -> tuple:
        """(volume, axis, index, target) of the slice a view shows; oblique views are refused."""
        from MedicalGeneralistLib import slicer_io

        axis, index = slicer_io.slice_axis_index(sliceNode, volume)
        return (volume, axis, index, target)

    @staticmethod
    def segmentSource(p):
        """The first example's segmentation: its segments, in its order, are the ones run."""
        return next((target for _v, _a, _i, target in p.examples
                     if target is not None and target.IsA("vtkMRMLSegmentationNode")), None)

    @staticmethod
    def requestFromParameterNode(p):
        from MedicalGeneralistLib import slicer_io
        from MedicalGeneralistLib.slicer_run import RunRequest

        model = p.modelPath if p.model == MedicalGeneralistWidget.LOCAL_MODEL else (p.model or None)
        if p.model == MedicalGeneralistWidget.LOCAL_MODEL and not p.modelPath:
            raise ValueError(_("Choose the local checkpoint file (model.safetensors) first."))
        names = None
        source = MedicalGeneralistLogic.segmentSource(p)
        if p.task == "segment" and source is not None:
            names = slicer_io.ticked_segment_names(source, p.excludedSegments)
            if names == []:
                raise ValueError(_("Tick at least one segment to propagate."))
        examples = [slicer_io.ExampleSlice(*e) for e in p.examples]
        return RunRequest(
            input_volume=p.inputVolume, task=p.task, examples=examples, segment_names=names, model=model,
            device=p.device, modality=p.modality, range_mode=p.rangeMode, range_slices=p.rangeSlices,
            mode=p.propagationMode, adapt_steps=None if p.adaptSteps < 0 else p.adaptSteps,
            output_segmentation=p.outputSegmentation if p.task == "segment" else None,
            mask_segmentation=p.maskSegmentation if p.task == "inpaint" else None)

    def worker(self):
        """The engine process, started on the first run and kept warm (imports, model) after it;
        shared by every Logic instance and the Segment Editor effect, so one process holds one
        copy of the model."""
        return MedicalGeneralistLogic.sharedWorker()

    @classmethod
    def sharedWorker(cls):
        if cls._shared_worker is None:
            from MedicalGeneralistLib.worker_client import WorkerProcess

            cls._shared_worker = WorkerProcess(*cls.workerCommand())
        return cls._shared_worker

    @staticmethod
    def workerCommand():
        """(python, environment) for the engine process: Slicer's own `PythonSlicer` launcher in
        Slicer's startup environment, as SlicerMONAIAuto3DSeg and launchConsoleProcess use."""
        python = shutil.which("PythonSlicer")
        if python is None:
            raise RuntimeError(_("PythonSlicer was not found beside Slicer: reinstall Slicer."))
        return python, slicer.util.startupEnvironment()

    def engineInfo(self) -> dict:
        """What the engine process said when it started (torch version, CUDA); {} before that."""
        worker = MedicalGeneralistLogic._shared_worker
        return dict(worker.info) if worker is not None else {}

    def startRun(self, request):
        """Read the scene now (main thread), hand the job to the engine process; returns at once
        with (prepared snapshot, WorkerJob to poll)."""
        from MedicalGeneralistLib import slicer_run

        prepared = slicer_run.prepare(request)
        return prepared, slicer_run.submit(prepared, self.worker())

    def shutdown(self) -> None:
        """Stop the engine process (frees its memory, GPU included); the next run starts it again."""
        if MedicalGeneralistLogic._shared_worker is not None:
            MedicalGeneralistLogic._shared_worker.stop()
            MedicalGeneralistLogic._shared_worker = None

    @staticmethod
    def write(prepared, result):
        from MedicalGeneralistLib import slicer_run

        return slicer_run.write(prepared, result)

    def process(self, inputVolume, task: str = "segment", examples=(), progress=None, cancel=None, **options):
        """Blocking run: the new (or extended) node, or None if cancelled (then nothing changed).

        examples: (volume, numpy axis, slice index, target) tuples; options: the fields of
        slicer_run.RunRequest (segment_names, model, device, modality, range_mode, ...).
        """
        from MedicalGeneralistLib import slicer_io
        from MedicalGeneralistLib import slicer_run

        rows = [e if isinstance(e, slicer_io.ExampleSlice) else slicer_io.ExampleSlice(*e) for e in examples]
        request = slicer_run.RunRequest(inputVolume, task, rows, **options)
        return slicer_run.process(request, self.worker(), progress=progress, cancel=cancel)


#
# MedicalGeneralistTest
#


class MedicalGeneralistTest(ScriptedLoadableModuleTest):
    """Runs in the Slicer application (CTest: py_MedicalGeneralist) on the bundled sample.

    The light part always runs and goes through the real path (parameter node -> request ->
    job folder -> engine process started with PythonSlicer -> cancel) without running the model,
    so the build factory needs neither torch nor minutes of CPU. The heavy part (a propagation
    with the shipped model through the warm engine process) runs with MEDGEN_SLICER_HEAVY_TEST=1.
    """

    HEAVY = os.environ.get("MEDGEN_SLICER_HEAVY_TEST") == "1"

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_DependencyCheckNeverRaises()
        self.setUp()
        self.test_CancelLeavesSceneUnchanged()
        if self.HEAVY:
            self.setUp()
            self.test_PropagateFromTwoSlices()
        else:
            logging.info("MedicalGeneralist: heavy test skipped (set MEDGEN_SLICER_HEAVY_TEST=1 to run it)")

    def _sample(self):
        from medgen.io.weights import resources_root

        root = resources_root() / "SampleData"
        volume = slicer.util.loadVolume(str(root / "mni152_t1_2mm.nii.gz"))
        labels = slicer.util.loadLabelVolume(str(root / "mni152_tissue_2mm.nii.gz"))
        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "tissue")
        seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        self.assertTrue(slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labels, seg))
        for i, name in enumerate(["grey matter", "white matter"]):
            seg.GetSegmentation().GetNthSegment(i).SetName(name)
        slicer.mrmlScene.RemoveNode(labels)
        return volume, seg

    def _examplesFromRedView(self, volume, seg, indices):
        """Add examples the way the button does: through the Red view's real slice node."""
        from MedicalGeneralistLib import slicer_io

        sliceWidget = slicer.app.layoutManager().sliceWidget("Red")
        sliceNode = sliceWidget.mrmlSliceNode()
        sliceNode.SetOrientation("Axial")
        sliceNode.RotateToVolumePlane(volume)
        ijkToRas = slicer_io.ijk_to_ras(volume)
        examples = []
        for k in indices:
            sliceNode.JumpSliceByCentering(*(ijkToRas @ [38, 47, k, 1])[:3])
            examples.append(MedicalGeneralistLogic.exampleFromView(sliceNode, volume, seg))
            self.assertEqual(examples[-1][1:3], (0, k))
        return examples

    def _parameterNode(self, logic, volume, examples, **fields):
        p = logic.getParameterNode()
        p.inputVolume, p.task, p.examples = volume, "segment", examples
        for name, value in fields.items():
            setattr(p, name, value)
        return p

    @staticmethod
    def _sceneState():
        ids = [slicer.mrmlScene.GetNthNode(i).GetID() for i in range(slicer.mrmlScene.GetNumberOfNodes())]
        voxels = {i: slicer.util.arrayFromVolume(slicer.mrmlScene.GetNodeByID(i)).tobytes() for i in ids
                  if slicer.mrmlScene.GetNodeByID(i).IsA("vtkMRMLScalarVolumeNode")}
        return ids, voxels

    def test_DependencyCheckNeverRaises(self):
        self.delayDisplay("Checking dependencies without installing anything")
        missing = missingDependencies()  # must not raise, whatever is installed
        self.assertIsInstance(missing, list)
        self.assertNotIn("itk", " ".join(r for r, _m in dependencies.PIP_REQUIREMENTS))
        self.delayDisplay("Test passed")

    def test_CancelLeavesSceneUnchanged(self):
        self.delayDisplay("Starting the engine process from the parameter node, then cancelling")
        volume, seg = self._sample()
        logic = MedicalGeneralistLogic()
        p = self._parameterNode(logic, volume, self._examplesFromRedView(volume, seg, [40]), rangeMode="whole")
        before = self._sceneState()
        prepared, job = logic.startRun(logic.requestFromParameterNode(p))
        self.assertTrue(job.folder.is_dir() and logic.worker().alive)
        start = time.perf_counter()
        job.cancel()
        self.assertLess(time.perf_counter() - start, 1.5)
        self.assertFalse(logic.worker().alive)
        from MedicalGeneralistLib import slicer_run

        self.assertIsNone(slicer_run.finish(prepared, job))
        self.assertEqual(self._sceneState(), before)
        self.assertFalse(job.folder.exists())
        logic.shutdown()
        self.delayDisplay("Test passed")

    def test_PropagateFromTwoSlices(self):
        self.delayDisplay("Propagating grey and white matter from two axial slices in the engine process")
        import numpy as np
        from MedicalGeneralistLib import slicer_io
        from MedicalGeneralistLib import slicer_run

        ensureDependencies(askConfirmation=not slicer.app.testingEnabled())
        volume, seg = self._sample()
        logic = MedicalGeneralistLogic()
        p = self._parameterNode(logic, volume, self._examplesFromRedView(volume, seg, [36, 42]),
                                rangeMode="between", device="auto")
        prepared, job = logic.startRun(logic.requestFromParameterNode(p))
        while not job.poll():  # what the widget's timer does, with the GUI kept alive
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertEqual(job.state, "done", str(job.error))
        out = slicer_run.finish(prepared, job)
        self.assertEqual(slicer_io.segment_names(out), ["grey matter", "white matter"])
        geometry = out.GetNodeReference(out.GetReferenceImageGeometryReferenceRole())
        self.assertEqual(geometry.GetID(), volume.GetID())
        masks = slicer_io.segment_masks(out, ["grey matter", "white matter"], volume)
        truth = slicer_io.segment_masks(seg, ["grey matter", "white matter"], volume)
        for name in masks:
            self.assertTrue(np.array_equal(masks[name][36], truth[name][36]))
            self.assertFalse(masks[name][:36].any() or masks[name][43:].any())
            self.assertTrue(masks[name][37:42].any())
        # the second run reuses the warm process: no new start
        pid = logic.worker().proc.pid
        self.assertIsNotNone(logic.process(volume, "segment", p.examples, range_mode="between"))
        self.assertEqual(logic.worker().proc.pid, pid)
        logic.shutdown()
        self.delayDisplay("Test passed")
