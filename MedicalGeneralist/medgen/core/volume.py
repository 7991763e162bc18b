"""A voxel array with its physical geometry, and the slice-axis arithmetic on it.

Arrays are kept in SimpleITK's numpy order (k, j, i) = (z, y, x), the order Slicer's
`arrayFromVolume` also returns, so that a volume passes between files, Slicer and the model
without transposes. Geometry (spacing, origin, direction) is kept in SimpleITK's (i, j, k) order
and LPS world, exactly as read, so that writing back reproduces the input grid.
2D images are volumes with one slice (shape (1, H, W)) and `is_2d` set.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from medgen.core.errors import InputError

AXIS_NAMES = {"axial": 2, "coronal": 1, "sagittal": 0}  # name -> world axis (LPS: x=L, y=P, z=S)


@dataclass
class Volume:
    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    is_2d: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    def with_array(self, array: np.ndarray) -> "Volume":
        """Same grid, new voxels (the output of a task keeps the input's exact geometry)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from volume shape {self.array.shape}")
        return replace(self, array=array)

    def same_grid(self, other: "Volume", tol: float = 1e-4) -> bool:
        """True when both volumes sample the same physical points (needed for voxel pairing)."""
        return (self.shape == other.shape
                and np.allclose(self.spacing, other.spacing, atol=tol)
                and np.allclose(self.origin, other.origin, atol=tol * 10)
                and np.allclose(self.direction, other.direction, atol=tol))

    def slice_thickness(self, axis: int) -> float:
        """Distance between slices taken along numpy `axis` (mm)."""
        return float(tuple(reversed(self.spacing))[axis])

    def slice_spacing(self, axis: int) -> tuple[float, float]:
        """In-plane pixel spacing (rows, cols) of slices taken along numpy `axis`."""
        numpy_spacing = tuple(reversed(self.spacing))
        rest = [numpy_spacing[a] for a in range(3) if a != axis]
        return rest[0], rest[1]


def parse_axis(value: str | int | None, volume: Volume) -> int:
    """Numpy axis from 0/1/2 or an anatomical name, using the direction matrix for names."""
    if volume.is_2d:
        if value not in (None, 0, "0", "axial"):
            raise InputError(f"slice axis {value} makes no sense for a 2D image: leave the axis out")
        return 0
    if value is None:
        return anatomical_axis("axial", volume)
    if isinstance(value, int) or (str(value).isascii() and str(value).isdigit()):
        axis = int(value)
        if axis not in (0, 1, 2):
            raise InputError(f"axis {axis} is out of range: use 0, 1, 2, axial, coronal or sagittal")
        return axis
    if str(value).lower() not in AXIS_NAMES:
        raise InputError(f"unknown axis {value!r}: use 0, 1, 2, axial, coronal or sagittal")
    return anatomical_axis(str(value).lower(), volume)


def anatomical_axis(name: str, volume: Volume) -> int:
    """The numpy axis whose direction is closest to the named anatomical axis.

    Direction columns are the world vectors of index axes i, j, k; numpy axis a is index axis 2-a.
    """
    direction = np.asarray(volume.direction, dtype=float).reshape(3, 3)
    world = AXIS_NAMES[name]
    index_axis = int(np.argmax(np.abs(direction[world, :])))
    return 2 - index_axis


def take_slice(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    """One 2D slice along a numpy axis, with a range check that names the valid indices."""
    n = array.shape[axis]
    if not 0 <= index < n:
        raise InputError(f"slice index {index} is out of range for axis {axis} (0..{n - 1})")
    return np.take(array, index, axis=axis)


def slice_view(array: np.ndarray, axis: int) -> np.ndarray:
    """The array with the slice axis first (a view: writing into it writes the volume)."""
    return np.moveaxis(array, axis, 0)
