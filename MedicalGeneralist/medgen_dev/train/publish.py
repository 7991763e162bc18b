"""Ship a trained checkpoint: copy it into Resources/Models/<id>/ and record it in Models.json.

The sha256 and size in the registry are computed from the file that ships, never typed by hand,
so a registry entry cannot drift from its weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from safetensors.torch import load_file

from medgen.core.config import IMAGE_TASKS, MODALITIES, ModelConfig
from medgen.nn.model import InContextUNet, count_parameters
from medgen.io.weights import file_sha256, resources_root, save_checkpoint


def publish(run_dir: Path, model_id: str, title: str, card: str, default: bool = True,
            license: str = "Apache-2.0") -> dict:
    model = InContextUNet(ModelConfig.from_file(run_dir / "config.json"))
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    root = resources_root()
    weights = save_checkpoint(model, root / "Models" / model_id, card)
    entry = {"id": model_id, "title": title,
             "source": {"type": "file", "path": f"Models/{model_id}"},
             "sha256": file_sha256(weights), "size": weights.stat().st_size,
             "config_sha256": file_sha256(weights.parent / "config.json"),
             "tasks": ["segment", *IMAGE_TASKS], "modalities": list(MODALITIES),
             "license": license, "card": f"Models/{model_id}/MODEL_CARD.md",
             "parameters": count_parameters(model)}
    registry_path = root / "Models.json"
    registry = json.loads(registry_path.read_text()) if registry_path.exists() else {
        "$schema": "./Models.schema.json", "default": model_id, "models": []}
    registry["models"] = [m for m in registry["models"] if m["id"] != model_id] + [entry]
    if default:
        registry["default"] = model_id
    registry_path.write_text(json.dumps(registry, indent=2) + "\n")
    return entry


def training_summary(run_dir: Path) -> str:
    """Steps, wall time and final losses read from the run's CSV log (never typed by hand)."""
    rows = [r.split(",") for r in (run_dir / "log.csv").read_text().splitlines() if r]
    last = rows[-50:]
    mean = lambda col: np.mean([float(r[col]) for r in last if r[col] != ""])
    return (f"{int(rows[-1][0])} steps in {float(rows[-1][1]) / 60:.0f} minutes of wall time; mean loss "
            f"over the last 50 steps: segmentation (Dice + BCE) {mean(4):.3f}, image tasks (L1) {mean(5):.4f}")


if __name__ == "__main__":
    run, mid, card_file = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    print(json.dumps(publish(run, mid, sys.argv[4] if len(sys.argv) > 4 else mid, card_file.read_text()), indent=2))
