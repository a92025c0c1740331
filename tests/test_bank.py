"""Stage 1: the Meta-LoRA bank on disk — layout, round trip, resume, and refusal of damaged or foreign banks."""

import dataclasses
import json
import shutil

import pytest
import torch
from conftest import snapshot, tiny_llama
from peft import PeftModel
from safetensors.torch import load_file

import mta.bank
from mta import __version__
from mta.adapters import extract
from mta.bank import FORMAT_VERSION, Bank, build_bank, plan_bank
from mta.config import BankConfig, LoraSpec
from mta.data.lamp import User
from mta.io import MTAError, sha256_file
from mta.models import load_base, model_signature


class NoEmbedder:
    """Fails the test if a resumed build embeds users again instead of reading plan.json."""

    def encode(self, *a, **k):
        raise AssertionError("the plan must be reloaded, not recomputed")


@pytest.fixture
def bank_copy(tiny_bank, tmp_path):
    shutil.copytree(tiny_bank.path, tmp_path / "bank")
    return tmp_path / "bank"


def test_manifest_fields(tiny_bank, bank_config, tiny_model_dir):
    m = tiny_bank.manifest
    assert m["format_version"] == FORMAT_VERSION and m["mta_version"] == __version__
    assert (m["task"], m["base_model"], m["embedding_model"]) == ("LaMP-2", str(tiny_model_dir), "all-minilm-l6-v2")
    assert m["base_signature"] == model_signature(load_base(str(tiny_model_dir), device="cpu")[0])
    assert m["embedding_dim"] == 384 and tiny_bank.embeddings.shape == (3, 384)
    assert m["config"] == bank_config.to_dict() and tiny_bank.config == bank_config
    plan = json.loads((tiny_bank.path / "plan.json").read_text())
    assert tiny_bank.anchor_ids == [a["id"] for a in plan["anchors"]] == ["anchor_000", "anchor_001", "anchor_002"]
    for record, planned in zip(m["anchors"], plan["anchors"]):
        folder = tiny_bank.path / "anchors" / record["id"]
        assert record["user_ids"] == planned["user_ids"] and len(record["user_ids"]) == 1  # mode "user"
        assert record["sha256"] == sha256_file(folder / "adapter_model.safetensors")
        assert record["num_examples"] == 6 and record["steps"] == 1 and record["final_loss"] > 0
    # anchor embeddings are unit vectors (cosine similarity is what fusion ranks by)
    torch.testing.assert_close(tiny_bank.embeddings.norm(dim=1), torch.ones(3))


def test_round_trip(tiny_bank):
    again = Bank.load(tiny_bank.path)
    assert again.manifest == tiny_bank.manifest
    assert again.fingerprint == tiny_bank.fingerprint == Bank.load(tiny_bank.path).fingerprint
    assert len(again.fingerprint) == 16
    assert torch.equal(again.embeddings, tiny_bank.embeddings)
    assert torch.equal(again.embeddings, load_file(tiny_bank.path / "anchors.safetensors")["embeddings"])
    assert again.task.id == "LaMP-2" and len(again) == 3


@pytest.mark.parametrize("anchor_id", ["anchor_000", "anchor_002"])
def test_anchor_is_the_peft_adapter_on_disk(tiny_bank, tiny_model_dir, anchor_id):
    folder = tiny_bank.path / "anchors" / anchor_id
    weights = tiny_bank.anchor(anchor_id)
    assert tiny_bank.anchor(anchor_id) is weights  # cached
    raw = load_file(folder / "adapter_model.safetensors")
    assert len(weights.modules) == 14 == len(raw) // 2  # all-linear: 7 projections x 2 layers
    live = extract(PeftModel.from_pretrained(load_base(str(tiny_model_dir), device="cpu")[0], folder), "default")
    for n, (a, b) in weights.modules.items():
        assert torch.equal(a, raw[f"base_model.model.{n}.lora_A.weight"])
        assert torch.equal(b, raw[f"base_model.model.{n}.lora_B.weight"])  # alpha = rank: scaling 1
        assert torch.equal(a, live.modules[n][0]) and torch.equal(b, live.modules[n][1])
    assert any(b.abs().max() > 0 for _, b in weights.modules.values()), "training moved B off its zero init"


def test_unknown_anchor(tiny_bank):
    with pytest.raises(MTAError, match="has no anchor 'anchor_999'"):
        tiny_bank.anchor("anchor_999")


def test_bank_config_round_trip(bank_config):
    assert BankConfig.from_dict(json.loads(json.dumps(bank_config.to_dict()))) == bank_config


# -- resume ----------------------------------------------------------------------------------------------------------

def _counting(monkeypatch):
    calls = []
    real = mta.bank.train_anchor

    def wrapper(model, tokenizer, anchor, *args, **kwargs):
        calls.append(anchor.id)
        return real(model, tokenizer, anchor, *args, **kwargs)

    monkeypatch.setattr(mta.bank, "train_anchor", wrapper)
    return calls


def test_interrupted_build_resumes_without_retraining(bank_copy, tiny_bank, tiny_model_dir, users, bank_config, monkeypatch):
    before = snapshot(bank_copy)
    shutil.rmtree(bank_copy / "anchors" / "anchor_001")
    (bank_copy / "manifest.json").unlink()
    with pytest.raises(MTAError, match="did not finish"):
        Bank.load(bank_copy)

    calls = _counting(monkeypatch)
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    bank = build_bank(users, bank_copy, bank_config, model, tok, NoEmbedder(), progress=False)

    assert calls == ["anchor_001"]
    after = snapshot(bank_copy)
    for name, data in before.items():
        if not name.startswith(("anchors/anchor_001/", "manifest.json")):
            assert after[name] == data, f"{name} was rewritten"
    assert bank.anchor_ids == tiny_bank.anchor_ids
    assert torch.equal(bank.embeddings, tiny_bank.embeddings)
    # per-anchor seeding: the retrained anchor starts and trains as it did the first time
    for n, (a, b) in tiny_bank.anchor("anchor_001").modules.items():
        torch.testing.assert_close(bank.anchor("anchor_001").modules[n][0], a, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(bank.anchor("anchor_001").modules[n][1], b, atol=1e-5, rtol=1e-4)


def test_resume_with_every_anchor_done_only_writes_the_manifest(bank_copy, tiny_model_dir, users, bank_config, monkeypatch):
    (bank_copy / "manifest.json").unlink()
    calls = _counting(monkeypatch)
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    bank = build_bank(users, bank_copy, bank_config, model, tok, NoEmbedder(), progress=False)
    assert calls == [] and len(bank) == 3 and (bank_copy / "manifest.json").is_file()
    # the build's cost is what the anchors recorded when they trained, not this resume's few milliseconds
    recorded = [json.loads((bank_copy / "anchors" / a / "mta_anchor.json").read_text())["train_seconds"] for a in bank.anchor_ids]
    assert bank.train_seconds == sum(recorded) > 0


@pytest.mark.parametrize("change", [
    lambda cfg, users: (dataclasses.replace(cfg, lora=LoraSpec(rank=8)), users),
    lambda cfg, users: (dataclasses.replace(cfg, num_retrieved=2), users),
    lambda cfg, users: (cfg, users[:-1]),
    lambda cfg, users: (cfg, [User(users[0].user_id, users[0].profile[:-1]), *users[1:]]),
], ids=["rank", "num_retrieved", "fewer-users", "other-profile"])
def test_plan_with_other_settings_or_data_is_refused(bank_copy, tiny_model_dir, users, bank_config, monkeypatch, change):
    (bank_copy / "manifest.json").unlink()
    before = snapshot(bank_copy)
    calls = _counting(monkeypatch)
    cfg, data = change(bank_config, users)
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    with pytest.raises(MTAError, match="holds a bank started with other settings or data; use another --out or delete it"):
        build_bank(data, bank_copy, cfg, model, tok, NoEmbedder(), progress=False)
    assert calls == [] and snapshot(bank_copy) == before


def test_a_plan_that_trained_nothing_gives_way_to_a_corrected_rerun(tmp_path, tiny_model_dir, users, bank_config, embedder, monkeypatch):
    """A first build that failed (or was stopped) before any anchor was saved leaves only its plan: a rerun with other
    settings replaces it instead of refusing."""
    wrong = dataclasses.replace(bank_config, anchors=dataclasses.replace(bank_config.anchors, num_clusters=2), num_retrieved=2)
    plan_bank(users, tmp_path / "bank", wrong, embedder, progress=False)
    (tmp_path / "bank" / "anchors" / ".anchor_000.x.tmp").mkdir(parents=True)  # what a killed first anchor leaves
    calls = _counting(monkeypatch)
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    bank = build_bank(users, tmp_path / "bank", bank_config, model, tok, embedder, progress=False)
    assert len(calls) == len(bank) == 3 and bank.config == bank_config


def test_bad_profile_item_fails_before_writing(tmp_path, users, bank_config, embedder):
    bad = [*users[:3], User("x", [{"description": "a movie"}])]
    with pytest.raises(MTAError, match=r"user 'x', profile item 0: profile item lacks field\(s\) \['tag'\]"):
        plan_bank(bad, tmp_path / "bank", bank_config, embedder, progress=False)
    assert not (tmp_path / "bank").exists()


def test_no_user_with_history(tmp_path, bank_config, embedder):
    with pytest.raises(MTAError, match="no user with a non-empty profile"):
        plan_bank([User("a", []), User("b", [])], tmp_path / "bank", bank_config, embedder, progress=False)
    assert not (tmp_path / "bank").exists()


# -- damaged, unfinished or foreign banks ----------------------------------------------------------------------------

def test_unfinished_bank_says_how_to_resume(bank_copy):
    (bank_copy / "manifest.json").unlink()
    with pytest.raises(MTAError, match=r"did not finish; rerun `mta bank build` with the same arguments to resume it"):
        Bank.load(bank_copy)


def test_not_a_bank(tmp_path):
    with pytest.raises(MTAError, match="is not a Meta-LoRA bank"):
        Bank.load(tmp_path)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_truncated_anchor_adapter(bank_copy):
    _truncate(bank_copy / "anchors" / "anchor_001" / "adapter_model.safetensors")
    bank = Bank.load(bank_copy)  # anchors are read lazily
    bank.anchor("anchor_000")
    with pytest.raises(MTAError, match=r"anchor_001/adapter_model.safetensors does not match the bank manifest \(changed or corrupt\)"):
        bank.anchor("anchor_001")


def test_truncated_anchor_adapter_with_matching_hash_is_still_caught(bank_copy):
    """Even if someone re-hashes the manifest, the reader reports the truncation instead of crashing."""
    path = bank_copy / "anchors" / "anchor_001" / "adapter_model.safetensors"
    _truncate(path)
    manifest = json.loads((bank_copy / "manifest.json").read_text())
    manifest["anchors"][1]["sha256"] = sha256_file(path)
    (bank_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MTAError, match="is not a readable safetensors file \\(truncated or corrupt\\?\\)"):
        Bank.load(bank_copy).anchor("anchor_001")


def test_missing_anchor_adapter(bank_copy):
    shutil.rmtree(bank_copy / "anchors" / "anchor_002")
    with pytest.raises(MTAError, match="is missing the adapter of anchor 'anchor_002'"):
        Bank.load(bank_copy).anchor("anchor_002")


def test_truncated_embeddings(bank_copy):
    _truncate(bank_copy / "anchors.safetensors")
    with pytest.raises(MTAError, match=r"anchors.safetensors is not a readable safetensors file \(truncated or corrupt\?\)"):
        Bank.load(bank_copy)


def test_embeddings_not_matching_the_manifest(bank_copy):
    from mta.io import atomic_save_tensors

    atomic_save_tensors(bank_copy / "anchors.safetensors", {"embeddings": torch.zeros(2, 384)})
    with pytest.raises(MTAError, match="does not hold one embedding per anchor"):
        Bank.load(bank_copy)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("base_signature"), r"lacks field\(s\) \['base_signature'\]"),
    (lambda m: m.update(format_version=FORMAT_VERSION + 1), "this mta reads up to 1: upgrade mta"),
])
def test_bad_manifest(bank_copy, edit, message):
    manifest = json.loads((bank_copy / "manifest.json").read_text())
    edit(manifest)
    (bank_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MTAError, match=message):
        Bank.load(bank_copy)


def test_manifest_not_json(bank_copy):
    (bank_copy / "manifest.json").write_text('{"format_version": 1,')
    with pytest.raises(MTAError, match=r"bank manifest .*manifest.json is not valid JSON \(line 1"):
        Bank.load(bank_copy)


def test_check_model(tiny_bank, tiny):
    tiny_bank.check_model(tiny[0])  # its own base passes
    for other in (tiny_llama(hidden_size=48), tiny_llama(vocab_size=500)):
        with pytest.raises(MTAError, match=r"was built for base model .*'hidden_size': 32.* the model given is .*"):
            tiny_bank.check_model(other)
