"""Model configuration and the fixed vocabularies (tasks, modalities) the embeddings index into.

The vocabularies are part of the checkpoint format: their order must never change, only grow at
the end, or old weights would condition on the wrong task.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

TASKS: tuple[str, ...] = ("segment", "denoise", "inpaint", "synthesize")
MODALITIES: tuple[str, ...] = ("ct", "mr", "xray", "us", "other")
IMAGE_TASKS: tuple[str, ...] = ("denoise", "inpaint", "synthesize")


def task_index(task: str) -> int:
    """Index of a task name in the embedding table, with a helpful error for typos."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    return TASKS.index(task)


def modality_index(modality: str) -> int:
    """Index of a modality name; unknown modalities map to 'other' only when asked explicitly."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}: choose one of {', '.join(MODALITIES)}")
    return MODALITIES.index(modality)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; saved beside every checkpoint as config.json."""

    channels: tuple[int, ...] = (16, 32, 64, 128, 160)
    embed_dim: int = 64
    heads: int = 4
    grid: int = 128  # side of the square grid the model was trained on (multiple of 16)
    interaction_levels: tuple[int, ...] = (1, 2, 3, 4)  # levels where the query meets each pair
    name: str = "medgen-small"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.grid % (2 ** (len(self.channels) - 1)):
            raise ValueError(f"grid {self.grid} must be a multiple of {2 ** (len(self.channels) - 1)}")

    @property
    def multiple(self) -> int:
        """Spatial sizes must be divisible by this (one halving per level below the top)."""
        return 2 ** (len(self.channels) - 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("channels", "interaction_levels"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(channels=(8, 16, 32, 48, 64), embed_dim=32, heads=2, name="medgen-tiny"),
    "small": ModelConfig(),
    "base": ModelConfig(channels=(24, 48, 96, 192, 256), embed_dim=128, heads=8, grid=192,
                        interaction_levels=(0, 1, 2, 3, 4), name="medgen-base"),
}
