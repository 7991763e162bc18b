"""Where model weights come from, how they are checked, and how they become an InContextUNet.

A checkpoint is a directory with three files: `model.safetensors` (float32 state dict; safetensors
because it cannot run code on load, unlike pickle), `config.json` (the ModelConfig that built the
state dict) and `MODEL_CARD.md` (what the model is for and what it must not be used for).

Models are named by a spec (see `resolve_model`): a registry id from `Resources/Models.json`, a
local path, or `hf://org/name[/subfolder]@<commit>`. Registry entries pin the sha256 of both the
weights and their config.json, checked before every load, so a corrupt download or a swapped or
edited file is refused rather than silently giving wrong segmentations. Every checkpoint, from any
source, is then checked the same way before use: a strict config, weight shapes compared with that
config before anything is allocated, and finite weights. Hub downloads go through the standard Hugging Face cache, so `HF_HUB_OFFLINE=1`
and hospital machines without network work as soon as the files are cached (or copied) there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from medgen.core.config import ModelConfig
from medgen.core.errors import WeightsError

if TYPE_CHECKING:  # torch is imported only where weights are read or written: listing the
    import torch   # registry (the Slicer panel's model list) must not load torch into the GUI

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
    expected_config_sha256: str | None = None  # the entry's pin of config.json


# -- checkpoints -------------------------------------------------------------------------------
def save_checkpoint(model: InContextUNet, directory: str | Path, card_text: str) -> Path:
    """Write model.safetensors, config.json and MODEL_CARD.md; returns the weights path.

    Each file is written beside its final name and then renamed, so that a reader (the Slicer
    module, an evaluation job) never sees a half-written checkpoint.
    """
    from safetensors.torch import save_file

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
    local = (f"; to use the local folder {model_id}, write it as a path: ./{model_id}"
             if Path(model_id).exists() else "")
    raise WeightsError(f"unknown model {model_id!r}: not in the registry (known ids: {known}), not "
                       f"hf://org/name@<commit> and not a path{local}")


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

    spec: None or "default" (the registry default), `hf://org/name[/subfolder]@<commit>`, a path
    (checkpoint directory, or a .safetensors file with config.json beside it), or a registry id.
    A registry id always means the registry's verified copy: a folder of the same name in the
    current directory is used only when written as a path (`./medgen-small`), so it can never
    replace the default model unnoticed. offline defaults to $HF_HUB_OFFLINE so that one switch
    covers this code and huggingface_hub itself.
    """
    offline = _offline_default() if offline is None else offline
    if spec is None or spec == "default":
        spec = load_registry()["default"]
    if spec.startswith(HF_PREFIX):
        repo, subfolder, revision = parse_hf_uri(spec)
        return _resolve_hub(spec, repo, revision, subfolder, offline)
    if _looks_like_path(spec):
        return _resolve_local(Path(spec).expanduser())
    return _resolve_entry(find_entry(spec), offline)


def parse_hf_uri(uri: str) -> tuple[str, str | None, str]:
    """`hf://org/name[/sub/folder]@revision` -> (org/name, subfolder or None, revision).

    The revision is required and must be a full commit hash: a branch (`@main`) or a tag could
    change under the user between two runs, and the commit is what the cache's content
    addresses are checked against.
    """
    body, _, revision = uri[len(HF_PREFIX):].rpartition("@")
    parts = [p for p in body.split("/") if p]
    if not revision or len(parts) < 2:
        raise WeightsError(f"bad Hub model {uri!r}: write hf://org/name@<commit> or "
                           "hf://org/name/subfolder@<commit> (the revision is required)")
    if not re.fullmatch(r"[0-9a-f]{40}", revision):
        raise WeightsError(f"Hub model {uri!r}: revision {revision!r} is not pinned: give the full "
                           "40-character commit hash (a branch or tag can change between runs)")
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
                             entry["sha256"], entry, entry["config_sha256"])
    resolved = _resolve_hub(entry["id"], source["repo"], source["revision"], source.get("subfolder"),
                            offline, force)
    if resolved.card_path is None and "card" in entry and (resources_root() / entry["card"]).is_file():
        resolved.card_path = resources_root() / entry["card"]
    resolved.expected_sha256, resolved.entry = entry["sha256"], entry
    resolved.expected_config_sha256 = entry["config_sha256"]
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
    """Fetch (or find in the cache) the checkpoint files of a Hub repo at a pinned commit.

    The cache is tried first: files of a pinned commit never change, so a cached copy needs no
    network. The cached files are checked against their content addresses (blob names), so a
    Hub model gets a checksum even without a registry entry.
    """
    from huggingface_hub import hf_hub_download

    kwargs = dict(revision=revision, subfolder=subfolder or None, cache_dir=_hf_cache_dir())
    try:
        paths = _hub_files(hf_hub_download, repo, kwargs, offline=True, force=False)
    except Exception as cached_error:  # noqa: BLE001 (any miss: try the network below, or explain)
        if offline:
            raise WeightsError(_hub_message(label, repo, revision, subfolder, offline, cached_error)) \
                from cached_error
        paths = None
    if paths is None or force:
        try:
            _require_network()
            paths = _hub_files(hf_hub_download, repo, kwargs, offline=False, force=force)
        except Exception as e:  # noqa: BLE001 (translated into what failed, in one line)
            raise WeightsError(_hub_message(label, repo, revision, subfolder, offline, e)) from e
    weights, config = paths
    for path in (weights, config):
        _check_content_address(label, path)
    try:
        card: Path | None = Path(hf_hub_download(repo, CARD_FILE, local_files_only=True, **kwargs))
    except Exception:  # noqa: BLE001 (the card is documentation: its absence must not block a load)
        card = None
    return ResolvedModel(label, weights, config, card, None, None)


def _hub_files(download, repo: str, kwargs: dict, offline: bool, force: bool) -> tuple[Path, Path]:
    """(weights, config) from the cache or the Hub, with huggingface_hub's retry log silenced."""
    from huggingface_hub.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        weights = download(repo, WEIGHTS_FILE, local_files_only=offline, force_download=force, **kwargs)
        config = download(repo, CONFIG_FILE, local_files_only=offline, force_download=force, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    return Path(weights), Path(config)


def _require_network() -> None:
    """One name lookup instead of huggingface_hub's five retries (23 s and 11 lines of log)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # behind a proxy the Hub's name may not resolve here, yet downloads work
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        raise ConnectionError(f"cannot reach {host}: no network or no name resolution") from e


def _check_content_address(label: str, path: Path) -> None:
    """A Hub cache stores each file as a blob named by its hash: sha256 for large (LFS) files,
    the git blob sha1 for small ones. A cached file that no longer matches its name is corrupt."""
    name = path.resolve().name
    if re.fullmatch(r"[0-9a-f]{64}", name):
        actual = file_sha256(path)
    elif re.fullmatch(r"[0-9a-f]{40}", name):
        data = path.read_bytes()
        actual = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 (git's hash)
    else:
        return  # a copy outside the blob store (no symlinks): nothing to compare with
    if actual != name:
        raise WeightsError(f"model {label}: the cached {path.name} is corrupt (its content no longer "
                           f"matches its hash {name[:12]}…): delete {path.resolve()} and download again")


def _hub_message(label: str, repo: str, revision: str, subfolder: str | None, offline: bool,
                 error: Exception) -> str:
    """Say what really failed: no cache offline, no network, no repo, no revision, no file..."""
    from huggingface_hub import errors as E

    where = f"hf://{repo}{'/' + subfolder if subfolder else ''}@{revision}"
    name = where if label == where else f"{label} ({where})"
    cache = _hf_cache_dir() or "the default Hugging Face cache"
    fetch = "" if label.startswith(HF_PREFIX) else f"run `medgen models download {label}` with network, or "
    if offline:
        return (f"model {name} is not in the local cache ({cache}) and downloads are off (offline "
                f"mode). To get it, {fetch}set HF_HUB_OFFLINE=0 to allow downloading, or pass a local "
                "checkpoint path.")
    if isinstance(error, E.GatedRepoError):
        why = f"the repository {repo} is gated: accept its terms on the Hub and log in (`hf auth login`)"
    elif isinstance(error, E.RepositoryNotFoundError):
        why = f"the repository {repo} does not exist or is private (log in with `hf auth login` if it is yours)"
    elif isinstance(error, E.RevisionNotFoundError):
        why = f"the repository {repo} has no commit {revision}"
    elif isinstance(error, E.RemoteEntryNotFoundError):
        why = f"the repository holds no {_hub_name(subfolder, WEIGHTS_FILE)} and {CONFIG_FILE} at that commit"
    elif isinstance(error, (ConnectionError, E.LocalEntryNotFoundError)):
        why = f"it is not in the local cache ({cache}) and the Hub cannot be reached ({error})"
    else:
        why = f"downloading failed ({type(error).__name__}: {(str(error).splitlines() or [''])[0]})"
    return f"model {name}: {why}. Or pass a local checkpoint path."


# -- loading and checking ----------------------------------------------------------------------
def load_model(spec: str | None = None, device: str | torch.device = "cpu",
               offline: bool | None = None) -> tuple[InContextUNet, ResolvedModel]:
    """Resolve, verify (sha256 of weights and config when pinned), check and load; eval mode."""
    resolved = resolve_model(spec, offline)
    _require_files(resolved)
    _check_checksums(resolved, memo=True)
    return _checked_model(resolved).to(device).eval(), resolved


def _checked_model(resolved: ResolvedModel) -> InContextUNet:
    """Build the model once the config is valid, load weights only once every shape matches it;
    refuse NaN/Inf weights. The model is built on the CPU (a few MB): building it on the meta
    device instead made torch import its compiler stack (torch._dynamo, about 2 s of every run)
    for the meta tensors' random init."""
    import torch

    from medgen.nn.model import InContextUNet

    config = _read_config(resolved.config_path)
    shapes = _file_shapes(resolved.weights_path)
    model = InContextUNet(config)
    _check_state_matches(model, shapes, resolved)
    state = _read_state_dict(resolved.weights_path)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(f"model {resolved.id}: {len(bad)} weight tensor(s) hold NaN or Inf (e.g. "
                           f"{', '.join(bad[:3])}) in {resolved.weights_path}: the checkpoint is "
                           "broken; use another one or train again")
    model.load_state_dict(state)
    return model


def verify_model(spec: str) -> str:
    """Check a model fully (checksums when pinned, config, shapes, finite weights); one OK line.

    `spec` is a registry id (its local copy, never downloaded here), a checkpoint path or a
    cached hf:// model.
    """
    resolved = (_resolve_entry(find_entry(spec), offline=True) if not _looks_like_path(spec)
                and not spec.startswith(HF_PREFIX) else resolve_model(spec, offline=True))
    _require_files(resolved)
    _check_checksums(resolved, memo=False)
    _checked_model(resolved)
    actual = file_sha256(resolved.weights_path)
    size = resolved.weights_path.stat().st_size
    pinned = "pinned sha256 match" if resolved.expected_sha256 else "no pinned checksum"
    return f"{resolved.id}: OK ({pinned}; weights sha256 {actual[:12]}, {size} bytes, {resolved.weights_path})"


def verify_all() -> list[str]:
    """verify_model for every registry model, in registry order (first failure raises)."""
    return [verify_model(m["id"]) for m in load_registry()["models"]]


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
        _check_checksums(resolved, memo=False)
    except WeightsError:
        if not hub:
            raise
        resolved = _resolve_entry(entry, offline=False, force=True)
        _check_checksums(resolved, memo=False)
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


def _check_checksums(resolved: ResolvedModel, memo: bool) -> None:
    """Weights and config.json against the registry's pins (both decide what the model does)."""
    digest = _memo_sha256 if memo else file_sha256
    for path, expected in ((resolved.weights_path, resolved.expected_sha256),
                           (resolved.config_path, resolved.expected_config_sha256)):
        actual = digest(path) if expected else None
        if expected and actual != expected.lower():
            raise WeightsError(f"checksum mismatch for model {resolved.id}: {path} has sha256 "
                               f"{actual[:12]}…, expected {expected[:12]}…; the file is corrupt or "
                               f"was replaced. {_fix_hint(resolved)}")


def _read_config(path: Path) -> ModelConfig:
    try:
        return ModelConfig.from_file(path)
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
        raise WeightsError(f"cannot read model config {path}: {e}. It must be the config.json saved "
                           "with the weights.") from e


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors header, without reading the tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"cannot read weights {path} (corrupt or truncated): {e}. Download or copy "
                           "the file again.") from e


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"cannot read weights {path} (corrupt or truncated): {e}. Download or copy "
                           "the file again.") from e


def _check_state_matches(model: InContextUNet, shapes: dict[str, tuple[int, ...]],
                         resolved: ResolvedModel) -> None:
    """Name a few bad keys: strict load_state_dict errors list hundreds and hide the cause."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(own.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - own.keys())
    mismatched = sorted(f"{k} {shapes[k]} vs {own[k]}"
                        for k in own.keys() & shapes.keys() if shapes[k] != own[k])
    problems = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
                for what, keys in (("missing", missing), ("unexpected", unexpected),
                                   ("shape-mismatched (file vs config)", mismatched)) if keys]
    if problems:
        raise WeightsError(f"weights do not match config.json for model {resolved.id} "
                           f"({resolved.weights_path}): {'; '.join(problems)}. Keep the "
                           f"{CONFIG_FILE} that was saved with these weights beside them.")
