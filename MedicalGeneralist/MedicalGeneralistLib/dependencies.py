"""What the engine needs in Slicer's Python, checked without importing any of it.

Standard library only, so that the check itself can never fail on a fresh Slicer: a dotted name
given to `importlib.util.find_spec` raises ModuleNotFoundError when its parent package is absent,
and importing torch to read its version would load it (and CUDA) into Slicer's GUI process.

Never installed or replaced by the module: Slicer's own numpy, SimpleITK (it carries Slicer's
IO) and vtk; nor pip's `itk` (Slicer's vtkITK does fill between slices, and pip's itk loaded into
Slicer's process has crashed Slicer). torch comes from the PyTorch extension (PyTorchUtils),
which picks the build that matches the GPU driver, and is checked against TORCH_REQUIREMENT.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re

TORCH_REQUIREMENT = ">=2.2"
# (pip requirement, import name). monai's own dependencies are torch and numpy (both Slicer's or
# the PyTorch extension's), so it is installed without them.
PIP_REQUIREMENTS = [("monai>=1.4", "monai"), ("safetensors>=0.4", "safetensors"),
                    ("huggingface_hub>=0.24", "huggingface_hub"), ("jsonschema>=4.20", "jsonschema"),
                    ("scipy>=1.10", "scipy"), ("scikit-image>=0.22", "skimage"),
                    ("scikit-learn>=1.3", "sklearn"), ("PyWavelets>=1.4", "pywt"), ("psutil>=5.9", "psutil")]
NO_DEPS = ("monai",)
PROTECTED_PACKAGES = ["torch", "numpy", "SimpleITK", "vtk", "itk"]


def importable(module: str) -> bool:
    """True when `module` could be imported; never imports it and never raises."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package; a module without a spec
        return False


def version_satisfies(version: str, requirement: str) -> bool:
    """PEP 440 comparison through `packaging` (Slicer ships it, pip needs it); a plain
    numeric comparison of '>=' requirements where it is missing."""
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion
    except ImportError:
        wanted = re.fullmatch(r">=\s*([\d.]+)", requirement.strip())
        numbers = lambda text: tuple(int(n) for n in re.findall(r"\d+", text)[:3])
        return wanted is None or numbers(version) >= numbers(wanted.group(1))
    try:
        return SpecifierSet(requirement).contains(version, prereleases=True)
    except InvalidVersion:
        return False


def torch_problem(requirement: str = TORCH_REQUIREMENT) -> str | None:
    """None when a suitable torch is installed; else what is wrong, in a few words."""
    if not importable("torch"):
        return "PyTorch is not installed"
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None  # importable without metadata (a source build): nothing to compare
    if not version_satisfies(version, requirement):
        return f"PyTorch {version} is installed but {requirement} is needed"
    return None


def missing_requirements() -> list[str]:
    """pip requirements (besides torch) whose package cannot be imported."""
    return [requirement for requirement, module in PIP_REQUIREMENTS if not importable(module)]


def missing() -> list[str]:
    """Names to show the user: 'torch' when it is missing or too old, then the pip packages."""
    names = ["torch"] if torch_problem() else []
    return names + [module for requirement, module in PIP_REQUIREMENTS if not importable(module)]


__all__ = ["TORCH_REQUIREMENT", "PIP_REQUIREMENTS", "PROTECTED_PACKAGES", "NO_DEPS", "importable",
           "version_satisfies", "torch_problem", "missing_requirements", "missing"]
