"""What the examples' correction strength does: `python -m medgen_dev.bench.strength [MODEL]`.

The bench's image rows (model column) three ways: the model's correction kept whole, its classical
start alone, and the share `imagetasks.correction_strength` fits on the example pairs (what runs
ship). The third column against the first two is the evidence for the mechanism; printed as a table.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from unittest import mock

from medgen.infer import imagetasks
from medgen.io.weights import load_model
from medgen_dev.bench.data import load_config
from medgen_dev.bench.runner import image_tasks

ARMS = {"kept whole": 1.0, "start alone": 0.0, "fitted on the examples": None}


def rows(model) -> dict[str, dict[str, float]]:
    """{row: {arm: model PSNR (dB)}, plus the best baseline's name and PSNR per row}."""
    out: dict[str, dict[str, float]] = {}
    for arm, fixed in ARMS.items():
        keep = nullcontext() if fixed is None else mock.patch.object(imagetasks, "correction_strength",
                                                                      lambda *a, s=fixed: s)
        with keep:
            for r in image_tasks(model, load_config(), "cpu", lambda m: None)[0]["rows"]:
                methods = r["methods"]
                out.setdefault(r["case"], {})[arm] = methods["ours"]["psnr"]
                base = {m: v["psnr"] for m, v in methods.items() if m not in ("ours", "auto", "noisy input")}
                out[r["case"]]["best classical"] = max(base.values())
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    model = load_model(argv[0] if argv else None)[0]
    print("| row (dB) | " + " | ".join([*ARMS, "best classical"]) + " |")
    print("|---" * (len(ARMS) + 2) + "|")
    for case, v in rows(model).items():
        print(f"| {case} | " + " | ".join(f"{v[a]:.2f}" for a in [*ARMS, "best classical"]) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
