"""Settings: checked when made, and importable (with the whole command-line parser) without torch."""

import subprocess
import sys

import pytest

from mta.config import BENCH_METHODS, AnchorConfig, BenchConfig, LoraSpec, StackConfig, TrainConfig
from mta.io import MTAError


@pytest.mark.parametrize("make", [
    lambda: TrainConfig(epochs=0), lambda: TrainConfig(epochs=-1), lambda: TrainConfig(learning_rate=-1),
    lambda: TrainConfig(learning_rate=float("nan")), lambda: TrainConfig(batch_size=0), lambda: TrainConfig(max_length=5),
    lambda: TrainConfig(mixed_precision="fp8"), lambda: LoraSpec(rank=0), lambda: AnchorConfig(num_clusters=0),
    lambda: AnchorConfig(mode="paper"), lambda: StackConfig(rank=0), lambda: StackConfig(top_layers=0),
    lambda: StackConfig(target_modules="all-linear"), lambda: BenchConfig("LaMP-2", methods=["nope"]),
    lambda: BenchConfig("LaMP-2", methods=[]), lambda: BenchConfig("LaMP-2", history_sizes=[0]),
    lambda: BenchConfig("LaMP-2", history_sizes=[2, 2]), lambda: BenchConfig("LaMP-2", bank_fractions=[1.5]),
    lambda: BenchConfig("LaMP-2", full_profile=False),
])
def test_bad_settings_are_refused_with_one_line(make):
    with pytest.raises(MTAError) as e:
        make()
    assert "\n" not in str(e.value)


def test_bench_methods_are_the_implemented_ones():
    from mta.bench import METHODS

    assert tuple(METHODS) == BENCH_METHODS


def test_parser_needs_no_torch():
    """`mta --help` and argument errors answer in well under a second: nothing heavy is imported to build the parser."""
    code = "import sys; from mta.cli import build_parser; build_parser(); print(sorted(m for m in ('torch', 'transformers', 'peft', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
