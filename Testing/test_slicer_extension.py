"""Extension packaging that only a Slicer build would otherwise catch: listed files, metadata.

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


def _cmake_list(text: str, variable: str) -> list[str]:
    body = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S).group(1)
    return [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_every_engine_script_is_installed() -> None:
    cmake = (MODULE / "CMakeLists.txt").read_text()
    listed = {s.replace("${MODULE_NAME}", "MedicalGeneralist") for s in _cmake_list(cmake, "MODULE_PYTHON_SCRIPTS")}
    present = {"MedicalGeneralist.py"} | {f"MedicalGeneralistLib/{p.name}" for p in (MODULE / "MedicalGeneralistLib").glob("*.py")}
    assert present - listed == set(), "add these to MODULE_PYTHON_SCRIPTS in MedicalGeneralist/CMakeLists.txt"
    assert listed - present == set(), "these are listed in CMakeLists.txt but do not exist"


def test_listed_resources_exist() -> None:
    cmake = (MODULE / "CMakeLists.txt").read_text()
    for resource in _cmake_list(cmake, "MODULE_PYTHON_RESOURCES"):
        assert (MODULE / resource.replace("${MODULE_NAME}", "MedicalGeneralist")).is_file(), resource
    for resource in _cmake_list(cmake, "ENGINE_RESOURCES"):
        assert (REPO / "Resources" / resource).is_file(), resource
    registry = json.loads((REPO / "Resources" / "Models.json").read_text())
    bundled = {m["source"]["path"] for m in registry["models"] if m["source"]["type"] == "file"}
    for path in bundled:  # every bundled model's files ship with the extension
        for name in ("model.safetensors", "config.json"):
            assert f"{path}/{name}" in _cmake_list(cmake, "ENGINE_RESOURCES"), f"{path}/{name}"


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
