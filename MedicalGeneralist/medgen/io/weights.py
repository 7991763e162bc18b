"""Where model weights come from, how they are checked, and how they become an InContextUNet.

A checkpoint is a directory with three files: `model.safetensors` (float32 state dict; safetensors
because it cannot run code on load, unlike pickle), `config.json` (the ModelConfig that built the
state dict) and `MODEL_CARD.md` (what the model is for and what it must not be used for).

Models are named by a spec (see `resolve_model`): a registry id from `Resources/Models.json`, a
local path, or `hf://org/name[/subfolder]@revision`. Registry entries pin a sha256 that is checked
before every load, so a corrupt download or a swapped file is refused rather than silently giving
wrong segmentations. Hub downloads go through the standard Hugging Face cache, so `HF_HUB_OFFLINE=1`
and hospital machines without network work as soon as the files are cached (or copied) there.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medgen.core.config import ModelConfig
from medgen.core.errors import WeightsError
from medgen.nn.model import InContextUNet

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "MODEL_CARD.md"
REGISTRY_FILE = "Models.json"
SCHEMA_FILE = "Models.schema.json"
HF_PREFIX = "hf://"
# Package data (Models.json, its schema, shipped checkpoints, sample data): found the same way from
# a checkout, an editable install, a wheel and the Slicer extension. Tests point it elsewhere.
PACKAGE_RESOURCES = Path(str(files("medgen") / "resources"))
RESOURCES = PACKAGE_RESOURCES
_TRUE = {"1", "true", "yes", "on"}
_HASH_MEMO: dict[tuple[str, int, int], str] = {}


@dataclass
class ResolvedModel:
    """A model spec turned into local files (which may still be missing: `load_model` checks)."""

    id: str
    weights_path: Path
    config_path: Path
    card_path: Path | None
    expected_sha256: str | None  # None for bare local paths: nothing to compare against
    entry: dict | None = None  # the Models.json entry, when the spec named one


# -- checkpoints -------------------------------------------------------------------------------
def save_checkpoint(model: InContextUNet, directory: str | Path, card_text: str) -> Path:
    """Write model.safetensors, config.json and MODEL_CARD.md; returns the weights path.

    Each file is written beside its final name and then renamed, so that a reader (the Slicer
    module, an evaluation job) never sees a half-written checkpoint.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: _float32(v) for k, v in model.state_dict().items()}
    weights = directory / WEIGHTS_FILE
    tmp = weights.with_name(WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "name": model.config.name})
    os.chmod(tmp, 0o644)  # safetensors creates 0600 files; shipped weights must be readable by all
    os.replace(tmp, weights)
    _write_text(directory / CONFIG_FILE, model.config.to_json() + "\n")
    _write_text(directory / CARD_FILE, card_text if card_text.endswith("\n") else card_text + "\n")
    return weights


def _float32(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy (safetensors refuses shared storage), floats as float32."""
    t = t.detach().to("cpu")
    return (t.float() if t.is_floating_point() else t).contiguous().clone()


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks so large weights never sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _memo_sha256(path: Path) -> str:
    """file_sha256, remembered per (path, size, mtime) so reloading in one session stays fast."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_MEMO:
        _HASH_MEMO[key] = file_sha256(path)
    return _HASH_MEMO[key]


# -- registry ----------------------------------------------------------------------------------
def resources_root() -> Path:
    """The engine's package data folder (Models.json, shipped weights, sample data)."""
    if RESOURCES.is_dir():
        return RESOURCES
    raise WeightsError(f"the model registry folder {RESOURCES} is missing: reinstall the package "
                       "or the extension, or pass a checkpoint directory")


def load_registry() -> dict:
    """Models.json, validated against Models.schema.json so a typo fails here, not mid-run."""
    path = resources_root() / REGISTRY_FILE
    if not path.is_file():
        raise WeightsError(f"no model registry at {path}: pass a checkpoint directory or "
                           "hf://org/name@revision instead")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"cannot read the model registry {path}: {e}") from e
    _validate_registry(data, path)
    return data


def _schema_path(root: Path) -> Path:
    for candidate in (root / SCHEMA_FILE, PACKAGE_RESOURCES / SCHEMA_FILE):
        if candidate.is_file():
            return candidate
    raise WeightsError(f"cannot find {SCHEMA_FILE} beside {root / REGISTRY_FILE}: reinstall the extension")


def _validate_registry(data: object, path: Path) -> None:
    """Schema errors (first few, with their JSON path), then what a schema cannot say."""
    import jsonschema

    schema = json.loads(_schema_path(path.parent).read_text(encoding="utf-8"))
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(data),
                    key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [f"{'/'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}" for e in errors[:3]]
        raise WeightsError(f"invalid model registry {path} ({len(errors)} problem(s)); fix it "
                           f"against {SCHEMA_FILE}:\n  " + "\n  ".join(lines))
    ids = [m["id"] for m in data["models"]]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise WeightsError(f"invalid model registry {path}: duplicate id(s) {', '.join(dupes)}")
    if data["default"] not in ids:
        raise WeightsError(f"invalid model registry {path}: default {data['default']!r} is not "
                           f"one of the models ({', '.join(ids)})")


def find_entry(model_id: str) -> dict:
    """The registry entry for an id, or an error listing the ids that exist."""
    registry = load_registry()
    for entry in registry["models"]:
        if entry["id"] == model_id:
            return entry
    known = ", ".join(m["id"] for m in registry["models"])
    raise WeightsError(f"unknown model {model_id!r}: not an existing path, not hf://org/name@revision, "
                       f"and not in the registry (known ids: {known})")


def list_models() -> list[dict]:
    """Registry entries plus 'available' (usable without network) and 'default' flags."""
    registry = load_registry()
    return [dict(entry, available=_is_available(entry), default=entry["id"] == registry["default"])
            for entry in registry["models"]]


def _is_available(entry: dict) -> bool:
    source = entry["source"]
    if source["type"] == "file":
        return _entry_files(entry)[0].is_file()
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source["repo"], _hub_name(source.get("subfolder"), WEIGHTS_FILE),
                                   cache_dir=_hf_cache_dir(), revision=source["revision"])
    return isinstance(found, str)


# -- resolving specs ---------------------------------------------------------------------------
def resolve_model(spec: str | None = None, offline: bool | None = None) -> ResolvedModel:
    """Turn a spec into local files, downloading from the Hub unless offline.

    spec: None or "default" (the registry default), `hf://org/name[/subfolder]@revision`, an
    existing path (checkpoint directory, or a .safetensors file with config.json beside it; a path
    wins over a registry id of the same name), or a registry id. offline defaults to
    $HF_HUB_OFFLINE so that one switch covers this code and huggingface_hub itself.
    """
    offline = _offline_default() if offline is None else offline
    if spec is None or spec == "default":
        spec = load_registry()["default"]
    if spec.startswith(HF_PREFIX):
        repo, subfolder, revision = parse_hf_uri(spec)
        return _resolve_hub(spec, repo, revision, subfolder, offline)
    if Path(spec).expanduser().exists() or _looks_like_path(spec):
        return _resolve_local(Path(spec).expanduser())
    return _resolve_entry(find_entry(spec), offline)


def parse_hf_uri(uri: str) -> tuple[str, str | None, str]:
    """`hf://org/name[/sub/folder]@revision` -> (org/name, subfolder or None, revision).

    The revision is required: an unpinned branch could change under the user between two runs.
    """
    body, _, revision = uri[len(HF_PREFIX):].rpartition("@")
    parts = [p for p in body.split("/") if p]
    if not revision or len(parts) < 2:
        raise WeightsError(f"bad Hub model {uri!r}: write hf://org/name@<commit> or "
                           "hf://org/name/subfolder@<commit> (the revision is required)")
    return f"{parts[0]}/{parts[1]}", "/".join(parts[2:]) or None, revision


def _offline_default() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _looks_like_path(spec: str) -> bool:
    """Registry ids never contain separators, so such a spec is a (missing) path, not an id."""
    return any(c in spec for c in "/\\") or spec.startswith((".", "~")) or spec.endswith(".safetensors")


def _resolve_local(path: Path) -> ResolvedModel:
    if path.is_dir():
        weights = path / WEIGHTS_FILE
    elif path.suffix == ".safetensors":
        weights = path  # may be missing: load_model names it
    else:
        what = "is not a checkpoint" if path.exists() else "does not exist"
        raise WeightsError(f"model path {path} {what}: pass a checkpoint directory "
                           f"({WEIGHTS_FILE}, {CONFIG_FILE}, {CARD_FILE}) or a .safetensors file")
    card = weights.parent / CARD_FILE
    return ResolvedModel(str(path), weights, weights.parent / CONFIG_FILE,
                         card if card.is_file() else None, None, None)


def _entry_files(entry: dict) -> tuple[Path, Path, Path]:
    """(weights, config, card) of a file-source entry; paths are relative to Resources/."""
    root = resources_root()
    base = root / entry["source"]["path"]
    weights = base if base.suffix == ".safetensors" else base / WEIGHTS_FILE
    card = root / entry["card"] if "card" in entry else weights.parent / CARD_FILE
    return weights, weights.parent / CONFIG_FILE, card


def _resolve_entry(entry: dict, offline: bool, force: bool = False) -> ResolvedModel:
    source = entry["source"]
    if source["type"] == "file":
        weights, config, card = _entry_files(entry)
        return ResolvedModel(entry["id"], weights, config, card if card.is_file() else None,
                             entry["sha256"], entry)
    resolved = _resolve_hub(entry["id"], source["repo"], source["revision"], source.get("subfolder"),
                            offline, force)
    if resolved.card_path is None and "card" in entry and (resources_root() / entry["card"]).is_file():
        resolved.card_path = resources_root() / entry["card"]
    resolved.expected_sha256, resolved.entry = entry["sha256"], entry
    return resolved


# -- Hugging Face Hub --------------------------------------------------------------------------
def _hf_cache_dir() -> str | None:
    """The hub cache, read from the environment now: huggingface_hub reads it once at import."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    home = os.environ.get("HF_HOME")
    return os.path.join(os.path.expanduser(home), "hub") if home else None


def _hub_name(subfolder: str | None, filename: str) -> str:
    return f"{subfolder.strip('/')}/{filename}" if subfolder else filename


def _resolve_hub(label: str, repo: str, revision: str, subfolder: str | None, offline: bool,
                 force: bool = False) -> ResolvedModel:
    """Fetch (or find in the cache) the checkpoint files of a Hub repo at a pinned revision."""
    from huggingface_hub import hf_hub_download

    kwargs = dict(revision=revision, subfolder=subfolder or None, cache_dir=_hf_cache_dir(),
                  local_files_only=offline)
    try:
        weights = hf_hub_download(repo, WEIGHTS_FILE, force_download=force, **kwargs)
        config = hf_hub_download(repo, CONFIG_FILE, **kwargs)
    except Exception as e:  # any hub failure (no cache, no network, gated repo) means the same to a user
        raise WeightsError(_not_cached_message(label, repo, revision, subfolder, offline, e)) from e
    try:
        card: Path | None = Path(hf_hub_download(repo, CARD_FILE, **kwargs))
    except Exception:  # the card is documentation: its absence must not block a load
        card = None
    return ResolvedModel(label, Path(weights), Path(config), card, None, None)


def _not_cached_message(label: str, repo: str, revision: str, subfolder: str | None, offline: bool,
                        error: Exception) -> str:
    where = f"hf://{repo}{'/' + subfolder if subfolder else ''}@{revision}"
    name = where if label == where else f"{label} ({where})"
    cache = _hf_cache_dir() or "the default Hugging Face cache"
    why = ("downloads are off (offline mode)" if offline
           else f"downloading failed ({type(error).__name__}: {(str(error).splitlines() or [''])[0]})")
    fetch = "" if label.startswith(HF_PREFIX) else f"run `medgen models download {label}` with network, "
    return (f"model {name} is not in the local cache ({cache}) and {why}. To get it, {fetch}"
            "set HF_HUB_OFFLINE=0 to allow downloading, or pass a local checkpoint path.")


# -- loading and checking ----------------------------------------------------------------------
def load_model(spec: str | None = None, device: str | torch.device = "cpu",
               offline: bool | None = None) -> tuple[InContextUNet, ResolvedModel]:
    """Resolve, verify (sha256 when known), build from config.json and load; eval mode on device."""
    resolved = resolve_model(spec, offline)
    _require_files(resolved)
    if resolved.expected_sha256:
        _check_checksum(resolved, _memo_sha256(resolved.weights_path))
    config = _read_config(resolved.config_path)
    state = _read_state_dict(resolved.weights_path)
    model = InContextUNet(config)
    _check_state_matches(model, state, resolved)
    model.load_state_dict(state)
    return model.to(device).eval(), resolved


def verify_model(model_id: str) -> str:
    """Recompute the sha256 of a registry model's local file; one-line OK or WeightsError."""
    resolved = _resolve_entry(find_entry(model_id), offline=True)
    _require_files(resolved)
    actual = file_sha256(resolved.weights_path)
    _check_checksum(resolved, actual)
    size = resolved.weights_path.stat().st_size
    return f"{model_id}: OK (sha256 {actual[:12]}, {size} bytes, {resolved.weights_path})"


def download_model(model_id: str) -> ResolvedModel:
    """Make a registry model available offline: fetch Hub entries, verify everything.

    A Hub file that fails its checksum is fetched once more with force_download, since a
    corrupt cache entry would otherwise be served again on every retry.
    """
    entry = find_entry(model_id)
    hub = entry["source"]["type"] == "huggingface"
    resolved = _resolve_entry(entry, offline=not hub)
    _require_files(resolved)
    try:
        _check_checksum(resolved, file_sha256(resolved.weights_path))
    except WeightsError:
        if not hub:
            raise
        resolved = _resolve_entry(entry, offline=False, force=True)
        _check_checksum(resolved, file_sha256(resolved.weights_path))
    return resolved


def _require_files(resolved: ResolvedModel) -> None:
    for path in (resolved.weights_path, resolved.config_path):
        if not path.is_file():
            raise WeightsError(f"model {resolved.id}: file not found: {path}. {_fix_hint(resolved)}")


def _fix_hint(resolved: ResolvedModel) -> str:
    if resolved.entry is None:
        return f"A checkpoint needs {WEIGHTS_FILE} and {CONFIG_FILE} side by side."
    if resolved.entry["source"]["type"] == "huggingface":
        return f"Re-download with `medgen models download {resolved.id}`."
    return ("The extension's bundled weights are missing or were replaced: reinstall the extension, "
            f"then check with `medgen models verify {resolved.id}`.")


def _check_checksum(resolved: ResolvedModel, actual: str) -> None:
    expected = resolved.expected_sha256
    if expected and actual != expected.lower():
        raise WeightsError(f"checksum mismatch for model {resolved.id}: {resolved.weights_path} has "
                           f"sha256 {actual[:12]}…, expected {expected[:12]}…; the file is corrupt or "
                           f"was replaced. {_fix_hint(resolved)}")


def _read_config(path: Path) -> ModelConfig:
    try:
        return ModelConfig.from_file(path)
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
        raise WeightsError(f"cannot read {path}: {e}. It must be the config.json saved with the weights.") from e


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"cannot read weights {path} (corrupt or truncated): {e}. Download or copy "
                           "the file again.") from e


def _check_state_matches(model: InContextUNet, state: dict[str, torch.Tensor],
                         resolved: ResolvedModel) -> None:
    """Name a few bad keys: strict load_state_dict errors list hundreds and hide the cause."""
    own = model.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    mismatched = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                        for k in own.keys() & state.keys() if state[k].shape != own[k].shape)
    problems = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
                for what, keys in (("missing", missing), ("unexpected", unexpected),
                                   ("shape-mismatched (file vs config)", mismatched)) if keys]
    if problems:
        raise WeightsError(f"weights do not match config.json for model {resolved.id} "
                           f"({resolved.weights_path}): {'; '.join(problems)}. Keep the "
                           f"{CONFIG_FILE} that was saved with these weights beside them.")
