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
