"""The module's .ui loads in Qt (PySide6, offscreen) and matches what MedicalGeneralist.py uses.

Slicer's custom widgets (qMRMLNodeComboBox, ctkCollapsibleButton...) load as their declared base
class here; what is checked is that every widget the code reaches exists, and that every
SlicerParameterName binding names a field of the typed parameter node.
"""

from __future__ import annotations

import ast
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

MODULE = Path(__file__).resolve().parents[1] / "MedicalGeneralist"
UI_FILE = MODULE / "Resources" / "UI" / "MedicalGeneralist.ui"
SOURCE = (MODULE / "MedicalGeneralist.py").read_text(encoding="utf-8")
WIDGET_SUFFIXES = ("Label", "Selector", "ComboBox", "Button", "SpinBox", "Widget", "LineEdit", "Bar")


def used_widget_names() -> set[str]:
    """`self.ui.<name>` accesses, plus names passed to getattr(self.ui, ...) as string literals."""
    direct = set(re.findall(r"self\.ui\.(\w+)", SOURCE))
    literals = {node.value for node in ast.walk(ast.parse(SOURCE))
                if isinstance(node, ast.Constant) and isinstance(node.value, str)
                and re.fullmatch(r"[a-z]\w*", node.value) and node.value.endswith(WIDGET_SUFFIXES)}
    return direct | literals


def parameter_fields() -> set[str]:
    tree = ast.parse(SOURCE)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedicalGeneralistParameterNode")
    return {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign)}


def ui_bindings() -> dict[str, str]:
    root = ET.parse(UI_FILE).getroot()
    out = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                out[widget.get("name")] = prop.find("string").text
    return out


@pytest.fixture(scope="module")
def loaded_ui():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    pytest.importorskip("PySide6.QtUiTools")
    from PySide6.QtCore import QFile, QIODevice
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    ui_file = QFile(str(UI_FILE))
    assert ui_file.open(QIODevice.OpenModeFlag.ReadOnly)
    widget = QUiLoader().load(ui_file)
    ui_file.close()
    assert widget is not None, "QUiLoader could not parse the .ui file"
    yield widget
    widget.deleteLater()
    app.processEvents()


def test_ui_loads_and_has_every_widget_the_code_uses(loaded_ui) -> None:
    from PySide6.QtCore import QObject

    names = used_widget_names()
    assert {"applyButton", "examplesTableWidget", "progressBar", "deviceWarningLabel"} <= names
    missing = sorted(n for n in names if loaded_ui.findChild(QObject, n) is None)
    assert not missing, f"widgets used in MedicalGeneralist.py but absent from the .ui: {missing}"


def test_parameter_bindings_name_real_fields(loaded_ui) -> None:
    from PySide6.QtCore import QObject

    bindings, fields = ui_bindings(), parameter_fields()
    assert bindings and {"inputVolume", "task", "device", "rangeMode", "outputSegmentation"} <= set(bindings.values())
    unknown = {w: p for w, p in bindings.items() if p not in fields}
    assert not unknown, f"SlicerParameterName without a parameter node field: {unknown}"
    for widget_name, parameter in bindings.items():  # the property survives loading (Slicer reads it)
        assert loaded_ui.findChild(QObject, widget_name).property("SlicerParameterName") == parameter


def test_node_selectors_get_the_scene() -> None:
    """Every qMRMLNodeComboBox is connected to the top widget's mrmlSceneChanged signal."""
    root = ET.parse(UI_FILE).getroot()
    selectors = {w.get("name") for w in root.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    connected = {c.find("receiver").text for c in root.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert selectors and selectors == connected


def choice_fields() -> dict[str, list[str]]:
    """Parameter node fields annotated with Choice([...]): field -> keys, in order."""
    tree = ast.parse(SOURCE)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedicalGeneralistParameterNode")
    out = {}
    for statement in cls.body:
        for call in ast.walk(statement):
            if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "Choice":
                out[statement.target.id] = ast.literal_eval(call.args[0])
    return out


def choice_labels() -> dict[str, dict[str, str]]:
    """CHOICE_LABELS of MedicalGeneralist.py, with the texts inside _("...") read as literals."""
    tree = ast.parse(SOURCE)
    node = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                and getattr(n.targets[0], "id", "") == "CHOICE_LABELS")
    text = lambda v: v.args[0].value if isinstance(v, ast.Call) else v.value
    return {k.value: {kk.value: text(vv) for kk, vv in zip(v.keys, v.values)} for k, v in zip(node.keys, node.values)}


def test_choice_combo_boxes_show_readable_labels(loaded_ui) -> None:
    """Each combo box bound to a Choice field gets a readable, distinct label for every key, put
    in by position the way the parameter node's connector fills the keys (read back by index)."""
    from PySide6.QtWidgets import QComboBox

    fields, labels, bindings = choice_fields(), choice_labels(), ui_bindings()
    bound = {w: p for w, p in bindings.items() if p in fields}
    assert {"task", "modality", "device", "view", "rangeMode", "propagationMode"} <= set(bound.values())
    for widget_name, parameter in bound.items():
        combo = loaded_ui.findChild(QComboBox, widget_name)
        combo.clear()
        combo.addItems(fields[parameter])  # what the connector does
        for index in range(combo.count()):  # what _labelChoiceComboBoxes does
            combo.setItemText(index, labels[parameter][combo.itemText(index)])
        shown = [combo.itemText(i) for i in range(combo.count())]
        assert set(labels[parameter]) == set(fields[parameter]), parameter
        assert len(set(shown)) == len(shown) and not set(shown) & set(fields[parameter]) - {"CT", "CPU"}, shown
    tooltips = " ".join(w.toolTip() for w in loaded_ui.findChildren(QComboBox))
    assert not re.search(r"\b(segment|auto|whole|propagate):", tooltips)  # no raw keys in the help
