"""Packaging that only a Slicer build or an install would otherwise catch: listed files, metadata.

slicerMacroBuildScriptedModule installs only the files CMakeLists.txt names, so an engine file
missing from the list breaks the installed extension with an ImportError; these checks run in
plain Python (no Slicer, no slicer-core).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "MedicalGeneralist"
EFFECT = REPO / "SegmentEditorFillFromExamples"


def _cmake_list(text: str, variable: str) -> list[str]:
    body = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S).group(1)
    return [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith("#")]


def _runtime_files() -> tuple[set[str], set[str]]:
    """(scripts, resources) that must ship: the module, its glue and the medgen package."""
    scripts = {"MedicalGeneralist.py"} | {str(p.relative_to(MODULE)) for p in (MODULE / "MedicalGeneralistLib").glob("*.py")}
    scripts |= {str(p.relative_to(MODULE)) for p in (MODULE / "medgen").rglob("*.py")}
    data = {str(p.relative_to(MODULE)) for p in (MODULE / "medgen" / "resources").rglob("*")
            if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts}
    return scripts, data


def test_every_runtime_file_is_installed_and_nothing_else() -> None:
    cmake = (MODULE / "CMakeLists.txt").read_text()
    listed = {s.replace("${MODULE_NAME}", "MedicalGeneralist") for s in _cmake_list(cmake, "MODULE_PYTHON_SCRIPTS")}
    scripts, data = _runtime_files()
    assert scripts - listed == set(), "add these to MODULE_PYTHON_SCRIPTS in MedicalGeneralist/CMakeLists.txt"
    assert listed - scripts == set(), "these are listed in CMakeLists.txt but are not runtime files"
    resources = {r.replace("${MODULE_NAME}", "MedicalGeneralist") for r in _cmake_list(cmake, "MODULE_PYTHON_RESOURCES")}
    assert data - resources == set(), "add these to MODULE_PYTHON_RESOURCES in MedicalGeneralist/CMakeLists.txt"
    for resource in resources:
        assert (MODULE / resource).is_file(), resource


def test_segment_editor_effect_module_is_built_with_all_its_files() -> None:
    """The hidden module that registers 'Fill from examples' ships every file it has."""
    assert "add_subdirectory(SegmentEditorFillFromExamples)" in (REPO / "CMakeLists.txt").read_text()
    cmake = (EFFECT / "CMakeLists.txt").read_text()
    name = "SegmentEditorFillFromExamples"
    listed = {s.replace("${MODULE_NAME}", name) for s in
              _cmake_list(cmake, "MODULE_PYTHON_SCRIPTS") + _cmake_list(cmake, "MODULE_PYTHON_RESOURCES")}
    on_disk = {str(p.relative_to(EFFECT)) for p in EFFECT.rglob("*")
               if p.is_file() and p.name != "CMakeLists.txt" and "__pycache__" not in p.parts}
    assert listed == on_disk
    assert re.search(rf"slicerMacroBuildScriptedModule\(\s*NAME \$\{{MODULE_NAME\}}", cmake)
    assert f"set(MODULE_NAME {name})" in cmake
    effect = (EFFECT / f"{name}Lib" / "SegmentEditorEffect.py").read_text()
    assert "AbstractScriptedSegmentEditorEffect" in effect and "saveStateForUndo" in effect
    assert "effect_logic" in effect  # its work is in the MedicalGeneralist module's runtime files
    assert "MedicalGeneralistLib/effect_logic.py" in _cmake_list((MODULE / "CMakeLists.txt").read_text(),
                                                                 "MODULE_PYTHON_SCRIPTS")


def test_contributors_are_not_placeholders() -> None:
    """No template placeholder as a contributor (no invented names either: the organisation)."""
    texts = [(REPO / "CMakeLists.txt").read_text(), (MODULE / "MedicalGeneralist.py").read_text(),
             (EFFECT / "SegmentEditorFillFromExamples.py").read_text()]
    for text in texts:
        assert not re.search(r"John Doe|AnyWare|Firstname|TemplateKey|\(Organization\)|Jean-Christophe", text)


def test_extension_ships_no_training_or_benchmark_code() -> None:
    """Training and the benchmark are for developers: not one of their files may reach Slicer."""
    cmake = (MODULE / "CMakeLists.txt").read_text()
    listed = _cmake_list(cmake, "MODULE_PYTHON_SCRIPTS") + _cmake_list(cmake, "MODULE_PYTHON_RESOURCES")
    dev = {p.stem for p in (MODULE / "medgen_dev").rglob("*.py")} - {"__init__"}
    assert dev >= {"trainer", "episodes", "runner", "baselines", "card"} or dev >= {"trainer", "episodes", "runner"}
    for entry in listed:
        assert "medgen_dev" not in entry and Path(entry).stem not in dev, entry


def test_bundled_models_ship_with_the_extension() -> None:
    registry = json.loads((MODULE / "medgen" / "resources" / "Models.json").read_text())
    cmake = (MODULE / "CMakeLists.txt").read_text()
    bundled = {m["source"]["path"] for m in registry["models"] if m["source"]["type"] == "file"}
    for path in bundled:
        for name in ("model.safetensors", "config.json"):
            assert f"medgen/resources/{path}/{name}" in _cmake_list(cmake, "MODULE_PYTHON_RESOURCES"), f"{path}/{name}"


def test_extension_metadata_and_catalog_entry() -> None:
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert re.search(r"set\(EXTENSION_DEPENDS PyTorch\)", cmake)
    assert "add_subdirectory(MedicalGeneralist)" in cmake
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(rf'set\(EXTENSION_{key} "[^"]+"\)', cmake), key
    entry = json.loads((REPO / "Resources" / "ExtensionsIndex" / "MedicalGeneralist.json").read_text())
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["build_dependencies"] == ["PyTorch"] and entry["category"] == "Segmentation"
    assert entry["scm_url"].startswith("https://github.com/") and entry["scm_revision"]
    registrations = [f for f in MODULE.rglob("CMakeLists.txt") if "slicer_add_python_unittest(" in f.read_text()]
    assert registrations == [MODULE / "Testing" / "Python" / "CMakeLists.txt"]  # once: test names are unique


def test_icons_are_128_pixel_pngs() -> None:
    for path in (REPO / "Resources" / "Icons" / "MedicalGeneralist.png", MODULE / "Resources" / "Icons" / "MedicalGeneralist.png"):
        header = path.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">II", header[16:24]) == (128, 128)


def _imported_modules(*args: str) -> set[str]:
    """Top-level-qualified names of every module a `python -X importtime -m medgen ...` loads."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(MODULE)}
    err = subprocess.run([sys.executable, "-X", "importtime", "-m", "medgen", *args], capture_output=True,
                         text=True, env=env, timeout=120).stderr
    return {line.rsplit("|", 1)[1].strip() for line in err.splitlines() if line.startswith("import time:")} - {"package"}


def test_run_help_loads_no_developer_itk_or_sitk_module() -> None:
    """Building the parser must not pay for the benchmark, training, ITK or SimpleITK."""
    loaded = _imported_modules("run", "--help")
    assert "medgen.cli" in loaded
    heavy = {m for m in loaded if m.split(".")[0] in ("medgen_dev", "itk", "SimpleITK", "torch", "monai")}
    assert heavy == set(), sorted(heavy)
