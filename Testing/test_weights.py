"""Weights and registry layer: checkpoints, checksums, Models.json, and the Hub cache (no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medgen.io import weights as W
from medgen.core.config import MODALITIES, PRESETS, TASKS
from medgen.core.errors import MedGenError, WeightsError
from medgen.nn.model import InContextUNet, count_parameters

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "f" * 40
CARD = "# medgen-tiny\n\nTest checkpoint; not for clinical use.\n"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every test runs offline against an empty cache, whatever the developer's environment."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))


@pytest.fixture(scope="module")
def tiny_model() -> InContextUNet:
    torch.manual_seed(0)
    return InContextUNet(PRESETS["tiny"]).eval()


@pytest.fixture
def ckpt(tmp_path: Path, tiny_model: InContextUNet) -> Path:
    """A saved tiny checkpoint directory."""
    W.save_checkpoint(tiny_model, tmp_path / "ckpt", CARD)
    return tmp_path / "ckpt"


def _entry(model_id: str, source: dict, weights: Path, **extra) -> dict:
    return {"id": model_id, "title": f"Test {model_id}", "source": source,
            "sha256": W.file_sha256(weights), "size": weights.stat().st_size,
            "config_sha256": W.file_sha256(weights.parent / W.CONFIG_FILE),
            "tasks": list(TASKS), "modalities": ["ct", "mr"], "license": "Apache-2.0",
            "parameters": 1000, **extra}


@pytest.fixture
def resources(tmp_path: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Resources folder with one file-source model (the schema comes from the source tree)."""
    root = tmp_path / "Resources"
    shutil.copytree(ckpt, root / "Models" / "tiny")
    weights = root / "Models" / "tiny" / W.WEIGHTS_FILE
    entry = _entry("medgen-tiny", {"type": "file", "path": "Models/tiny"}, weights,
                   card="Models/tiny/MODEL_CARD.md")
    _write_registry(root, "medgen-tiny", [entry])
    monkeypatch.setattr(W, "RESOURCES", root)
    return root


def _write_registry(root: Path, default: str, models: list[dict]) -> None:
    data = {"$schema": "./Models.schema.json", "default": default, "models": models}
    (root / W.REGISTRY_FILE).write_text(json.dumps(data, indent=2))


def _hub_cache(cache: Path, repo: str, commit: str, files: dict[str, Path], subfolder: str = "") -> None:
    """Lay out a Hugging Face cache by hand: blobs by sha, snapshot symlinks, refs/main."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    for name, src in files.items():
        blob = repo_dir / "blobs" / W.file_sha256(src)
        shutil.copyfile(src, blob)
        link = repo_dir / "snapshots" / commit / subfolder / name
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            link.symlink_to(Path("..", *([".."] * len(Path(subfolder).parts)), "..", "blobs", blob.name))
        except OSError:  # no symlinks (Windows without developer mode): the cache also accepts copies
            shutil.copyfile(blob, link)


@pytest.fixture
def hub_cache(tmp_path: Path, ckpt: Path) -> Path:
    cache = tmp_path / "hf_home" / "hub"
    files = {n: ckpt / n for n in (W.WEIGHTS_FILE, W.CONFIG_FILE, W.CARD_FILE)}
    _hub_cache(cache, "org/name", COMMIT, files)
    _hub_cache(cache, "org/multi", COMMIT, files, subfolder="tiny")
    return cache


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# -- checkpoints -------------------------------------------------------------------------------
def test_errors_hierarchy() -> None:
    assert issubclass(WeightsError, MedGenError) and issubclass(MedGenError, Exception)


def test_save_writes_three_files(ckpt: Path) -> None:
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([W.WEIGHTS_FILE, W.CONFIG_FILE, W.CARD_FILE])
    assert json.loads((ckpt / W.CONFIG_FILE).read_text())["name"] == "medgen-tiny"
    assert (ckpt / W.CARD_FILE).read_text() == CARD


def test_round_trip(ckpt: Path, tiny_model: InContextUNet) -> None:
    model, resolved = W.load_model(str(ckpt))
    _assert_same_state(model, tiny_model)
    assert not model.training
    assert model.config == tiny_model.config
    assert resolved.expected_sha256 is None and resolved.card_path == ckpt / W.CARD_FILE


def test_load_by_safetensors_file(ckpt: Path, tiny_model: InContextUNet) -> None:
    model, resolved = W.load_model(str(ckpt / W.WEIGHTS_FILE))
    _assert_same_state(model, tiny_model)
    assert resolved.config_path == ckpt / W.CONFIG_FILE


def test_missing_file(ckpt: Path) -> None:
    (ckpt / W.WEIGHTS_FILE).unlink()
    with pytest.raises(WeightsError, match="not found.*model.safetensors"):
        W.load_model(str(ckpt))
    with pytest.raises(WeightsError, match="does not exist"):
        W.load_model(str(ckpt.parent / "nowhere"))


def test_truncated_file(ckpt: Path, tmp_path: Path) -> None:
    bad = tmp_path / "truncated"
    shutil.copytree(ckpt, bad)
    data = (bad / W.WEIGHTS_FILE).read_bytes()
    (bad / W.WEIGHTS_FILE).write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        W.load_model(str(bad))


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all" * 10])
def test_garbage_file(ckpt: Path, content: bytes) -> None:
    (ckpt / W.WEIGHTS_FILE).write_bytes(content)
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        W.load_model(str(ckpt))


def test_wrong_config(ckpt: Path) -> None:
    (ckpt / W.CONFIG_FILE).write_text(PRESETS["small"].to_json())
    with pytest.raises(WeightsError, match="do not match config.json") as info:
        W.load_model(str(ckpt))
    assert "vs" in str(info.value)  # names at least one mismatched shape


def test_bad_config_json(ckpt: Path) -> None:
    (ckpt / W.CONFIG_FILE).write_text("{not json")
    with pytest.raises(WeightsError, match="cannot read"):
        W.load_model(str(ckpt))


def test_file_sha256(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"abc")
    assert W.file_sha256(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# -- registry ----------------------------------------------------------------------------------
def test_registry_by_id_and_default(resources: Path, tiny_model: InContextUNet) -> None:
    for spec in ("medgen-tiny", "default", None):
        model, resolved = W.load_model(spec)
        _assert_same_state(model, tiny_model)
        assert resolved.id == "medgen-tiny"
        assert resolved.expected_sha256 == resolved.entry["sha256"]
        assert resolved.card_path == resources / "Models" / "tiny" / W.CARD_FILE


def test_registry_checksum_mismatch(resources: Path) -> None:
    registry = json.loads((resources / W.REGISTRY_FILE).read_text())
    registry["models"][0]["sha256"] = "0" * 64
    (resources / W.REGISTRY_FILE).write_text(json.dumps(registry))
    with pytest.raises(WeightsError, match="checksum mismatch.*corrupt or was replaced"):
        W.load_model("medgen-tiny")
    with pytest.raises(WeightsError, match="checksum mismatch"):
        W.verify_model("medgen-tiny")


def test_replaced_file_checksum_mismatch(resources: Path, tiny_model: InContextUNet) -> None:
    other = InContextUNet(PRESETS["tiny"])
    W.save_checkpoint(other, resources / "Models" / "tiny", CARD)
    with pytest.raises(WeightsError, match="checksum mismatch"):
        W.load_model("medgen-tiny")


def test_verify_and_list(resources: Path) -> None:
    assert "OK" in W.verify_model("medgen-tiny")
    models = W.list_models()
    assert [(m["id"], m["available"], m["default"]) for m in models] == [("medgen-tiny", True, True)]
    (resources / "Models" / "tiny" / W.WEIGHTS_FILE).unlink()
    assert W.list_models()[0]["available"] is False
    with pytest.raises(WeightsError, match="not found"):
        W.verify_model("medgen-tiny")


def test_unknown_id(resources: Path) -> None:
    with pytest.raises(WeightsError, match="unknown model.*medgen-tiny"):
        W.resolve_model("no-such-model")


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["models"][0].pop("sha256"), "sha256"),
    (lambda r: r["models"][0].update(tasks=["classify"]), "classify"),
    (lambda r: r["models"][0]["source"].update(type="s3"), "source"),
    (lambda r: r.update(default="absent"), "default"),
    (lambda r: r["models"].append(dict(r["models"][0])), "duplicate"),
])
def test_registry_invalid(resources: Path, mutate, message: str) -> None:
    registry = json.loads((resources / W.REGISTRY_FILE).read_text())
    mutate(registry)
    (resources / W.REGISTRY_FILE).write_text(json.dumps(registry))
    with pytest.raises(WeightsError, match="invalid model registry") as info:
        W.resolve_model("medgen-tiny")
    assert message in str(info.value)


def test_no_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(W, "RESOURCES", tmp_path)
    with pytest.raises(WeightsError, match="no model registry"):
        W.resolve_model(None)


def test_schema_vocabularies_match_config() -> None:
    """The schema is static JSON: it must follow TASKS/MODALITIES when they grow."""
    schema = json.loads((W.PACKAGE_RESOURCES / W.SCHEMA_FILE).read_text())
    props = schema["$defs"]["model"]["properties"]
    assert tuple(props["tasks"]["items"]["enum"]) == TASKS
    assert tuple(props["modalities"]["items"]["enum"]) == MODALITIES


def test_schema_rejects_escaping_paths(resources: Path) -> None:
    registry = json.loads((resources / W.REGISTRY_FILE).read_text())
    registry["models"][0]["source"]["path"] = "../elsewhere"
    (resources / W.REGISTRY_FILE).write_text(json.dumps(registry))
    with pytest.raises(WeightsError, match="invalid model registry"):
        W.list_models()


def test_parameters_field_is_honest(tiny_model: InContextUNet) -> None:
    assert count_parameters(tiny_model) > 0  # Models.json "parameters" is filled from this


# -- Hugging Face Hub (hand-made cache, offline) -----------------------------------------------
def test_parse_hf_uri() -> None:
    assert W.parse_hf_uri(f"hf://org/name@{COMMIT}") == ("org/name", None, COMMIT)
    assert W.parse_hf_uri(f"hf://org/name/a/b@{COMMIT}") == ("org/name", "a/b", COMMIT)
    for bad in ("hf://org/name", "hf://name@abc", "hf://org/name@"):
        with pytest.raises(WeightsError, match="revision is required"):
            W.parse_hf_uri(bad)


def test_hub_offline_from_cache(hub_cache: Path, tiny_model: InContextUNet) -> None:
    spec = f"hf://org/name@{COMMIT}"
    resolved = W.resolve_model(spec)
    assert resolved.id == spec and resolved.expected_sha256 is None
    assert str(resolved.weights_path).startswith(str(hub_cache))
    assert resolved.card_path is not None and resolved.card_path.read_text() == CARD
    model, _ = W.load_model(spec)
    _assert_same_state(model, tiny_model)


def test_hub_subfolder(hub_cache: Path, tiny_model: InContextUNet) -> None:
    model, resolved = W.load_model(f"hf://org/multi/tiny@{COMMIT}")
    _assert_same_state(model, tiny_model)
    assert resolved.weights_path.parent.name == "tiny"


def test_hub_uncached(hub_cache: Path) -> None:
    for spec in (f"hf://org/name@{OTHER_COMMIT}", f"hf://org/absent@{COMMIT}"):
        with pytest.raises(WeightsError, match="not in the local cache.*HF_HUB_OFFLINE=0"):
            W.resolve_model(spec)


def test_hub_registry_entry(hub_cache: Path, resources: Path, ckpt: Path,
                            tiny_model: InContextUNet) -> None:
    weights = ckpt / W.WEIGHTS_FILE
    cached = _entry("hub-tiny", {"type": "huggingface", "repo": "org/name", "revision": COMMIT}, weights)
    sub = _entry("hub-sub", {"type": "huggingface", "repo": "org/multi", "revision": COMMIT,
                             "subfolder": "tiny"}, weights)
    absent = _entry("hub-absent", {"type": "huggingface", "repo": "org/name",
                                   "revision": OTHER_COMMIT}, weights)
    _write_registry(resources, "hub-tiny", [cached, sub, absent])
    model, resolved = W.load_model()
    _assert_same_state(model, tiny_model)
    assert resolved.id == "hub-tiny" and resolved.expected_sha256 == cached["sha256"]
    assert "OK" in W.verify_model("hub-sub")
    assert {m["id"]: m["available"] for m in W.list_models()} == {
        "hub-tiny": True, "hub-sub": True, "hub-absent": False}
    with pytest.raises(WeightsError, match="medgen models download hub-absent"):
        W.load_model("hub-absent")


def test_download_file_entry_only_verifies(resources: Path) -> None:
    resolved = W.download_model("medgen-tiny")
    assert resolved.weights_path.is_file()
