"""Export: one PEFT adapter (fused + stacked, ranks concatenated) that plain PEFT loads with our logits."""

import json

import pytest
import torch
from conftest import logits, snapshot
from peft import PeftModel

from mta.cli import main
from mta.config import FusionConfig, StackConfig, TrainConfig
from mta.export import export_stored_user, export_user, vllm_rank
from mta.fusion import merge, plan_fusion
from mta.io import MTAError
from mta.models import load_base
from mta.serve.store import open_store
from mta.stacking import UserRecord, load_personalized, save_user, user_adapters, with_adapters
from mta.tasks import get_task, loo_examples
from mta.training import train

TASK = get_task("LaMP-2")
FAST = TrainConfig(epochs=2, batch_size=4, max_length=128, learning_rate=1e-2)


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory, random_bank, tiny_model_dir, users):
    """A user fused from two random anchors (rank 4 each) with a trained rank-2 stacked LoRA: rank 10 in all."""
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    record = plan_fusion(random_bank, torch.tensor([1.0, 0.5, 0.0]), FusionConfig(k=2))
    fused = merge(random_bank, record)
    model = with_adapters(model, fused, StackConfig(rank=2, train=FAST))
    torch.manual_seed(0)
    train(model, tok, loo_examples(TASK, users[0].profile), FAST, progress=False)
    folder = tmp_path_factory.mktemp("user") / "alice"
    save_user(folder, model, UserRecord("alice", TASK.id, str(tiny_model_dir), random_bank.fingerprint, record, {"rank": 2}),
              users[0].profile)
    return folder


def _ours(random_bank, tiny_model_dir, user_dir, input_ids):
    return logits(load_personalized(random_bank, user_dir, load_base(str(tiny_model_dir), device="cpu")[0])[0], input_ids)


@pytest.mark.parametrize("pad_rank", [None, 16])
def test_peft_loads_the_export_with_our_logits(tmp_path, random_bank, tiny_model_dir, user_dir, input_ids, pad_rank):
    written = export_user(random_bank, user_dir, tmp_path / "export", pad_rank=pad_rank)
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert written.rank == config["r"] == (pad_rank or 2 * 4 + 2) and config["lora_alpha"] == config["r"]

    peft_model = PeftModel.from_pretrained(load_base(str(tiny_model_dir), device="cpu")[0], tmp_path / "export")
    ours = _ours(random_bank, tiny_model_dir, user_dir, input_ids)
    torch.testing.assert_close(logits(peft_model, input_ids), ours, atol=1e-5, rtol=1e-5)
    _, fused, _ = user_adapters(random_bank, user_dir)
    fused_only = logits(with_adapters(load_base(str(tiny_model_dir), device="cpu")[0], fused, None), input_ids)
    assert not torch.allclose(ours, fused_only, atol=1e-4), "the stacked LoRA must be part of the export"


def test_pad_rank_is_checked(tmp_path, random_bank, user_dir):
    assert [vllm_rank(r) for r in (1, 2, 8, 10, 33)] == [1, 8, 8, 16, 64]
    with pytest.raises(MTAError, match="at least 16"):
        export_user(random_bank, user_dir, tmp_path / "x", pad_rank=8)
    assert not (tmp_path / "x").exists()


def test_cli_exports_folders_and_live_store_users(tmp_path, random_bank, user_dir, capsys):
    bank = str(random_bank.path)
    assert main(["export", "--bank", bank, "--user", str(user_dir), "--out", str(tmp_path / "a"), "--pad-rank", "16"]) == 0
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 16
    assert "--max-lora-rank 16" in capsys.readouterr().out
    assert main(["export", "--bank", bank, "--user", str(user_dir), "--out", str(tmp_path / "b"), "--pad-rank", "4"]) == 2

    record, _, stacked = user_adapters(random_bank, user_dir)  # the same user, in a server's store
    with open_store(tmp_path / "store") as live:  # the server holds the store while we export from it
        user = live.put(UserRecord(**{**record.__dict__, "stack": None}), [])
        live.set_stacked(record, stacked, expected_version=user.version)
        assert main(["export", "--bank", bank, "--store", str(tmp_path / "store"), "--user-id", "alice", "--out", str(tmp_path / "c")]) == 0
        assert main(["export", "--bank", bank, "--store", str(tmp_path / "store"), "--out", str(tmp_path / "d")]) == 2
    from_folder = export_user(random_bank, user_dir, tmp_path / "e")
    with open_store(tmp_path / "store", readonly=True) as store:  # and after the server stopped
        from_store = export_stored_user(random_bank, store, "alice", tmp_path / "f")
    assert all(torch.equal(from_store.delta(n), from_folder.delta(n)) for n in from_folder.modules)
    assert (tmp_path / "c" / "adapter_model.safetensors").read_bytes() == (tmp_path / "e" / "adapter_model.safetensors").read_bytes()


def test_cli_export_never_replaces_what_it_did_not_write(tmp_path, random_bank, user_dir, capsys):
    argv = ["export", "--bank", str(random_bank.path), "--user", str(user_dir), "--out", str(tmp_path / "out")]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    assert main(argv) == 2 and main([*argv, "--overwrite"]) == 2
    assert "is a folder that is not an mta export (no mta_export.json)" in capsys.readouterr().err
    assert snapshot(tmp_path / "out") == {"notes.txt": b"keep me"}

    (tmp_path / "out" / "notes.txt").unlink()  # empty: written
    assert main(argv) == 0
    assert json.loads((tmp_path / "out" / "mta_export.json").read_text())["user_id"] == "alice"
    before = snapshot(tmp_path / "out")
    capsys.readouterr()
    assert main(argv) == 2 and "is an mta export already; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--pad-rank", "16"]) == 0 and snapshot(tmp_path / "out") != before
