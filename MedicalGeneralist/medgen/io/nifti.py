"""Checks of a NIfTI file's voxel payload that ITK's reader does not make.

Measured with SimpleITK 2.5 (ITK 5.4): a .nii or .nii.gz cut short is read without error, the
missing voxels as zeros; NaN and Inf voxels of a float NIfTI come back as 0. Both would give a
confident, wrong result, so the payload is checked here before ITK reads it: its length against
the header's dimensions and data type, and float voxels for non-finite values. Hand-parsed
(the header layout is fixed by the NIfTI-1/-2 standards) because the only library that reads it,
nibabel, would be a dependency for ten header fields; the payload is streamed in chunks, so a
large volume is never held twice.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from medgen.core.errors import InputError

CHUNK = 8 << 20
FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of the float types ITK reads


def _header(head: bytes) -> tuple[str, list[int], int, int, int] | None:
    """(byte order, dims, datatype, bitpix, vox_offset), or None when this is not NIfTI-1/-2."""
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            dims = struct.unpack(order + "8h", head[40:56])
            datatype, bitpix = struct.unpack(order + "2h", head[70:74])
            offset = struct.unpack(order + "f", head[108:112])[0]
            return order, list(dims), datatype, bitpix, int(offset) if np.isfinite(offset) else -1
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            datatype, bitpix = struct.unpack(order + "2h", head[12:16])
            dims = struct.unpack(order + "8q", head[16:80])
            offset = struct.unpack(order + "q", head[168:176])[0]
            return order, list(dims), datatype, bitpix, offset
    return None


def _open(path: Path) -> BinaryIO:
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def check_payload(path: Path) -> None:
    """Refuse a NIfTI whose voxel data is shorter than its header says, or holds NaN/Inf.

    Headers this cannot make sense of are left to ITK, which refuses them with its own reason.
    """
    try:
        with _open(path) as f:
            parsed = _header(f.read(540))
            if parsed is None:
                return
            order, dims, datatype, bitpix, offset = parsed
            if not 1 <= dims[0] <= 7 or min(dims[1:dims[0] + 1]) < 1 or bitpix <= 0 or offset < 0:
                return
            expected = (int(np.prod(dims[1:dims[0] + 1], dtype=object)) * bitpix + 7) // 8
            f.seek(offset)
            got, bad = _scan(f, expected, np.dtype(order + FLOAT_TYPES[datatype])
                             if datatype in FLOAT_TYPES else None)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise InputError(f"{path}: the file is truncated or corrupt ({err}): copy or export it "
                         "again") from err
    except OSError as err:
        raise InputError(f"{path}: cannot read the file ({err})") from err
    if got < expected:
        raise InputError(f"{path}: the file is truncated: its header describes {expected} bytes of "
                         f"voxel data but it holds {got} ({100 * got // expected}%): copy or export "
                         "it again")
    if bad:
        raise InputError(f"{path}: {bad} voxels are NaN or Inf: replace them (e.g. with 0) first")


def _scan(f: BinaryIO, expected: int, dtype: np.dtype | None) -> tuple[int, int]:
    """(bytes of payload present, non-finite values among them), reading CHUNK bytes at a time."""
    got = bad = 0
    carry = b""
    while got < expected:
        chunk = f.read(min(CHUNK, expected - got))
        if not chunk:
            break
        got += len(chunk)
        if dtype is not None:
            data = carry + chunk
            usable = len(data) - len(data) % dtype.itemsize
            bad += int((~np.isfinite(np.frombuffer(data[:usable], dtype))).sum())
            carry = data[usable:]
    return got, bad
