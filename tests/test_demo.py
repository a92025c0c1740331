"""`mta demo`: a bank of its own, small enough for minutes on a CPU, announced before it starts."""

from mta.config import PersonalizeConfig
from mta.data.lamp import User
from mta.demo import DEMO_ANCHORS, DEMO_BANK_USERS, demo_bank_config, estimate_minutes, run_demo
from mta.presets import preset


def test_the_demo_bank_is_small_and_announced(tmp_path, tiny_model_dir, capsys):
    result = run_demo(tmp_path / "demo", str(tiny_model_dir), num_eval_users=2, device="cpu", dtype="float32")
    out = capsys.readouterr().out
    plan = next(line for line in out.splitlines() if line.startswith("plan: "))
    assert out.index(plan) < out.index("stage 1:") and "min on an idle 2-core AVX2 CPU" in plan
    manifest = (tmp_path / "demo" / "bank" / "manifest.json").read_text()
    assert f'"num_clusters": {DEMO_ANCHORS}' in manifest and '"epochs": 1.0' in manifest
    assert f"{DEMO_BANK_USERS} bank users, 2 held-out users" in out and set(result) == {"base", "mta", "minutes"}


def test_the_demo_fits_in_ten_minutes_on_two_avx2_cores():
    """The estimate from per-example times measured on a 2-core AVX2 EPYC, for LaMP-2's shared users (10 items each)."""
    users = [User(str(i), [{"description": "d", "tag": "comedy"}] * 10) for i in range(DEMO_BANK_USERS + 4)]
    minutes = estimate_minutes(users[:DEMO_BANK_USERS], users[DEMO_BANK_USERS:], demo_bank_config("smollm2-135m"),
                               preset(PersonalizeConfig(), "LaMP-2"))
    assert minutes < 10
