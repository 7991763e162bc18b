"""Model configuration and the fixed vocabularies (tasks, modalities) the embeddings index into.

The vocabularies are part of the checkpoint format: their order must never change, only grow at
the end, or old weights would condition on the wrong task.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
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


MAX_CHANNELS = 4096  # far above any model that fits a workstation; checked before allocating
MAX_GRID = 1024
MAX_LEVELS = 8
DENOISE_INPUTS = ("slice-nlm", "tuned-nlm", "tuned-nlm+noisy")  # see ModelConfig.denoise_inputs
LEGACY_KEYS = {"extra": {}}  # written by checkpoints up to 0.2.0, always empty; nothing reads it


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; saved beside every checkpoint as config.json.

    Validated on construction: a config.json decides how much memory is allocated before any
    weight shape can be compared, so an edited or corrupt one must fail here, not after gigabytes.
    """

    channels: tuple[int, ...] = (16, 32, 64, 128, 160)
    embed_dim: int = 64
    heads: int = 4
    grid: int = 128  # side of the square grid the model was trained on (multiple of 16)
    interaction_levels: tuple[int, ...] = (1, 2, 3, 4)  # levels where the query meets each pair
    name: str = "medgen-small"
    # what a denoising query gives the model: "slice-nlm" NL-means from each slice's own noise
    # estimate; "tuned-nlm" NL-means with its noise level and strength fitted on the example pairs
    # (as the bench's NL-means baseline is); "tuned-nlm+noisy" that and the noisy slice beside it in
    # the prior channel (the detail NL-means smoothed away is only there)
    denoise_inputs: str = "slice-nlm"

    def __post_init__(self) -> None:
        def whole(value: object, lo: int, hi: int, what: str) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{what} must be a whole number from {lo} to {hi}, not {value!r}")

        if not isinstance(self.channels, tuple) or not 2 <= len(self.channels) <= MAX_LEVELS:
            raise ValueError(f"channels must list 2 to {MAX_LEVELS} widths, not {self.channels!r}")
        for c in self.channels:
            whole(c, 1, MAX_CHANNELS, "each of channels")
        whole(self.embed_dim, 1, MAX_CHANNELS, "embed_dim")
        whole(self.heads, 1, self.channels[-1], "heads")
        whole(self.grid, 16, MAX_GRID, "grid")
        if self.channels[-1] % self.heads:
            raise ValueError(f"heads {self.heads} must divide the last width {self.channels[-1]}")
        if self.grid % (2 ** (len(self.channels) - 1)):
            raise ValueError(f"grid {self.grid} must be a multiple of {2 ** (len(self.channels) - 1)}")
        levels = self.interaction_levels
        if not isinstance(levels, tuple) or len(set(levels)) != len(levels):
            raise ValueError(f"interaction_levels must list distinct levels, not {levels!r}")
        for level in levels:
            whole(level, 0, len(self.channels) - 1, "each of interaction_levels")
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a string, not {self.name!r}")
        if self.denoise_inputs not in DENOISE_INPUTS:
            raise ValueError(f"denoise_inputs must be one of {', '.join(DENOISE_INPUTS)}, not {self.denoise_inputs!r}")

    @property
    def multiple(self) -> int:
        """Spatial sizes must be divisible by this (one halving per level below the top)."""
        return 2 ** (len(self.channels) - 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: object) -> "ModelConfig":
        """Strict: an object with known keys only (a typo must not fall back to a default)."""
        if not isinstance(data, dict):
            raise ValueError(f"a model config is a JSON object, not a {type(data).__name__}")
        data = {k: v for k, v in data.items() if not (k in LEGACY_KEYS and v == LEGACY_KEYS[k])}
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}; known: "
                             f"{', '.join(cls.__dataclass_fields__)}")
        data = dict(data)
        for key in ("channels", "interaction_levels"):
            if key in data:
                if not isinstance(data[key], (list, tuple)):
                    raise ValueError(f"{key} must be a list of whole numbers, not {data[key]!r}")
                data[key] = tuple(data[key])
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(channels=(8, 16, 32, 48, 64), embed_dim=32, heads=2, name="medgen-tiny"),
    "small": ModelConfig(),
    "base": ModelConfig(channels=(24, 48, 96, 192, 256), embed_dim=128, heads=8, grid=192,
                        interaction_levels=(0, 1, 2, 3, 4), name="medgen-base"),
}
