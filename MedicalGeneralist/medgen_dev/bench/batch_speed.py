"""`medgen batch` against a shell loop of `medgen run` on the same cases, same bytes required.

    python -m medgen_dev.bench.batch_speed [--cases 20]

Cases: axial slabs of 24 slices of the shipped MNI152 sample (2 mm, 94 x 77), each with its grey/
white-matter labels on 5 slices, at different positions (so every case differs). Reports both
wall times, the ratio, and whether every output file is byte-identical.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk


def make_cases(folder: Path, count: int) -> list[dict]:
    from medgen.io.weights import resources_root

    root = resources_root() / "SampleData"
    t1, tissue = sitk.ReadImage(str(root / "mni152_t1_2mm.nii.gz")), sitk.ReadImage(str(root / "mni152_tissue_2mm.nii.gz"))
    rows = []
    for i in range(count):
        lo = 10 + (i * 2) % 40
        name = f"case{i:02d}"
        sitk.WriteImage(t1[:, :, lo:lo + 24], str(folder / f"{name}.nii.gz"))
        sitk.WriteImage(tissue[:, :, lo:lo + 24], str(folder / f"{name}_labels.nii.gz"))
        rows.append({"image": f"{name}.nii.gz", "labels": f"{name}_labels.nii.gz", "slices": "2,7,12,17,21",
                     "output": f"{name}_out.nii.gz", "modality": "mr"})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medgen_dev.bench.batch_speed")
    ap.add_argument("--cases", type=int, default=20)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = make_cases(folder, args.cases)
        t = time.perf_counter()
        for r in rows:
            subprocess.run([sys.executable, "-m", "medgen", "run", "--task", "segment", "--image", str(folder / r["image"]),
                            "--context-target", str(folder / r["labels"]), "--context-slices", r["slices"],
                            "--modality", "mr", "--quiet", "--out", str(folder / ("run_" + r["output"]))], check=True)
        loop = time.perf_counter() - t
        with open(folder / "manifest.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "medgen", "batch", str(folder / "manifest.csv"), "--quiet"], check=True,
                       capture_output=True)
        batch = time.perf_counter() - t
        same = all((folder / ("run_" + r["output"])).read_bytes() == (folder / r["output"]).read_bytes() for r in rows)
    print(f"| cases | {args.cases} `medgen run` calls (s) | one `medgen batch` (s) | speed-up | byte-identical |")
    print("|---|---|---|---|---|")
    print(f"| {args.cases} | {loop:.1f} | {batch:.1f} | {loop / batch:.1f}x | {same} |")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
