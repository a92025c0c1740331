"""Every setting of every stage, as plain dataclasses that import no torch.

The command line builds its parser (and prints defaults in `--help`) from these in a fraction of a second;
the stage modules import them from here. Each config checks its own values when it is made, so a library
user gets the same one-line error for a non-positive count or rate as a command-line user does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from mta.io import MTAError

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_EMBEDDER = "all-minilm-l6-v2"
MIXED_PRECISION = ("auto", "bf16", "no")
ADAPTER_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # how stored stacked LoRAs may be kept: torch dtype names
MIN_MAX_LENGTH = 64  # shorter token budgets cannot hold a prompt and its answer
# `mta bench`'s methods, in report order (mta.bench.METHODS implements them)
BENCH_METHODS = ("base", "rag", "per-user-lora", "merge-only", "stack-only", "recipe", "mta")


def require(ok: bool, message: str) -> None:
    if not ok:
        raise MTAError(message)


def positive(name: str, value: float | int) -> None:
    require(isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
            f"{name} must be a positive number, got {value!r}")


def check_adapter_dtype(dtype: str) -> None:
    require(dtype in ADAPTER_DTYPES, f"unknown adapter dtype {dtype!r}; use {' or '.join(ADAPTER_DTYPES)}")


def at_least(name: str, value: int, low: int) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= low,
            f"{name} must be an integer of at least {low}, got {value!r}")


@dataclass
class TrainConfig:
    epochs: float = 2.0
    learning_rate: float = 3e-4
    batch_size: int = 4
    max_length: int = 384
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0
    # bf16 matmuls over fp32 weights: "auto" where the hardware is fast at them (2-2.5x per step on AVX512-BF16 CPUs)
    mixed_precision: str = "auto"

    def __post_init__(self):
        positive("epochs", self.epochs)
        positive("learning rate", self.learning_rate)
        at_least("batch size", self.batch_size, 1)
        at_least("max length (tokens)", self.max_length, MIN_MAX_LENGTH)
        require(0 <= self.warmup_ratio < 1, f"warmup ratio must lie in [0, 1), got {self.warmup_ratio!r}")
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay!r}")
        require(self.mixed_precision in MIXED_PRECISION,
                f"unknown mixed precision {self.mixed_precision!r}; use {', '.join(MIXED_PRECISION)}")


def anchor_training() -> TrainConfig:
    """As hard as a per-user LoRA: an anchor must teach the task's answer form (a tag, a headline's length) before
    any one user's style; both tasks tuned to it (benchmarks/results/tuning.md, task-bank and cv-bank)."""
    return TrainConfig(epochs=3.0, learning_rate=2e-3)


@dataclass
class LoraSpec:
    rank: int = 8
    alpha: float | None = None  # None → alpha = rank: scaling 1, so fusion weights mean what they say
    target_modules: str | list[str] = "all-linear"
    dropout: float = 0.0

    def __post_init__(self):
        at_least("LoRA rank", self.rank, 1)
        require(self.alpha is None or self.alpha > 0, f"LoRA alpha must be positive, got {self.alpha!r}")
        require(0 <= self.dropout < 1, f"LoRA dropout must lie in [0, 1), got {self.dropout!r}")

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha or self.rank, target_modules=self.target_modules,
                          lora_dropout=self.dropout, bias="none", task_type="CAUSAL_LM")


@dataclass
class AnchorConfig:
    num_clusters: int = 8
    min_history: int = 5
    mode: Literal["user", "cluster"] = "cluster"  # tuned (benchmarks/results/tuning.md): user mode was worst
    seed: int = 0

    def __post_init__(self):
        at_least("number of clusters", self.num_clusters, 1)
        at_least("min history", self.min_history, 1)
        require(self.mode in ("user", "cluster"), f"unknown anchor mode {self.mode!r}; use 'user' or 'cluster'")


@dataclass
class BankConfig:
    task: str
    base_model: str = DEFAULT_MODEL
    embedding_model: str = DEFAULT_EMBEDDER
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainConfig = field(default_factory=anchor_training)
    num_retrieved: int = 1

    def __post_init__(self):
        at_least("retrieved history items", self.num_retrieved, 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BankConfig":
        return cls(task=d["task"], base_model=d["base_model"], embedding_model=d["embedding_model"],
                   anchors=AnchorConfig(**d["anchors"]), lora=LoraSpec(**d["lora"]), train=TrainConfig(**d["train"]),
                   num_retrieved=d["num_retrieved"])


@dataclass
class FusionConfig:
    k: int = 1  # tuned on LaMP-2/4 (benchmarks/results/tuning.md): the nearest anchor alone beat k = 2..4
    weighting: Literal["normalized", "softmax", "published"] = "normalized"
    temperature: float = 0.1
    merge: str = "exact"  # exact | linear | svd | recipe
    rank: int | None = None  # svd only; default: the anchors' rank
    # the weights sum to `scale` (task arithmetic's λ): below 1 the user starts nearer the base model
    # (exact and svd scale ΔW by it; linear, which scales A and B alike, by its square)
    scale: float = 1.0
    # Per user (mta.fusion_weights): "fixed" takes the planned weights as they are; "pick" chooses k and scale from
    # pick_k × pick_scale by the loss on the user's own leave-one-out examples (forward passes only); "learn" trains
    # one weight per anchor with the stacked LoRA, "learn-layer" one per anchor and stacked layer. Learned weights
    # live on the stacked layers only: below them the planned weights stay, so training keeps entering at the first
    # stacked layer with the rest of the fused adapter folded into W.
    adapt: Literal["fixed", "pick", "learn", "learn-layer"] = "fixed"
    pick_k: list[int] | None = None  # None: k alone
    pick_scale: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    learn_lr: float = 0.05  # Adam moves each weight by about this much per step
    learn_decay: float = 0.0  # AdamW's decay of the learned change, i.e. a pull back toward the planned weights

    def __post_init__(self):
        at_least("k (anchors fused)", self.k, 1)
        positive("softmax temperature", self.temperature)
        positive("fusion scale", self.scale)
        require(self.rank is None or (isinstance(self.rank, int) and self.rank >= 1), f"svd rank must be at least 1, got {self.rank!r}")
        require(self.adapt in ("fixed", "pick", "learn", "learn-layer"),
                f"unknown fusion adapt {self.adapt!r}; use fixed, pick, learn or learn-layer")
        for k in self.pick_k or []:
            at_least("a picked k", k, 1)
        require(bool(self.pick_scale), "pick_scale needs at least one scale")
        for s in self.pick_scale:
            positive("a picked scale", s)
        positive("learned weights' learning rate", self.learn_lr)
        require(math.isfinite(self.learn_decay) and self.learn_decay >= 0, f"learn decay must be >= 0, got {self.learn_decay!r}")
        require(not self.adapt.startswith("learn") or self.merge == "exact",
                f"learned fusion weights need the exact merge (ΔW linear in the weights), not {self.merge!r}")


@dataclass
class StackConfig:
    rank: int = 2
    alpha: float | None = None  # None → alpha = rank
    target_modules: str | list[str] | None = None  # None: PEFT's default per architecture (q_proj, v_proj for Llama)
    # Tuned (benchmarks/results/tuning.md): the top 8 of the default model's 30 layers, 2 epochs at 2e-2, the
    # best within 1/3 of the per-user LoRA's training time. Nothing below the top layers trains, so backprop
    # stops there and, after the first pass, training reuses what the bottom layers made of each example.
    # A task that tuned better on its own has its changes in mta.presets (LaMP-4: lr 5e-3).
    top_layers: int | None = 8
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2.0, learning_rate=2e-2))

    def __post_init__(self):
        at_least("stack rank", self.rank, 1)
        require(self.alpha is None or self.alpha > 0, f"stack alpha must be positive, got {self.alpha!r}")
        require(self.top_layers is None or (isinstance(self.top_layers, int) and self.top_layers >= 1),
                f"stack top_layers must be at least 1 (or None: every layer), got {self.top_layers!r}")
        require(self.top_layers is None or not isinstance(self.target_modules, str),
                f"stack target_modules {self.target_modules!r} cannot be limited to the top layers (a PEFT rule); "
                "name the modules, e.g. ['q_proj', 'v_proj'], or set top_layers=None")

    def layers(self, num_layers: int) -> list[int]:
        """The decoder layers the stacked LoRA adapts: the top `top_layers`, or every one (None, or more than there are)."""
        return list(range(max(0, num_layers - (self.top_layers or num_layers)), num_layers))

    def peft_config(self, num_layers: int):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha or self.rank, target_modules=self.target_modules,
                          layers_to_transform=None if self.top_layers is None else self.layers(num_layers), lora_dropout=0.0,
                          bias="none", task_type="CAUSAL_LM")


@dataclass
class PersonalizeConfig:
    fusion: FusionConfig | None = field(default_factory=FusionConfig)  # None: no fusion (stack-only)
    stack: StackConfig | None = field(default_factory=StackConfig)  # None: no stacking (merge-only)
    num_retrieved: int = 1
    adapter_dtype: str = "fp32"  # how the user folder keeps the stacked LoRA: "bf16" halves its bytes

    def __post_init__(self):
        at_least("retrieved history items", self.num_retrieved, 0)
        check_adapter_dtype(self.adapter_dtype)


@dataclass(frozen=True)
class Decoding:
    """Greedy decoding's one rule, the same for every method a benchmark compares.

    no_repeat_ngram: no n-gram of this many tokens occurs twice in an output (0: off).
    """

    no_repeat_ngram: int = 0

    def __post_init__(self):
        at_least("no-repeat n-gram size", self.no_repeat_ngram, 0)


@dataclass
class BenchConfig:
    """Every setting of a `mta bench` run; written into results.json so a table can be traced to its settings.

    Defaults are the winners of benchmarks/tune.py on tuning users (benchmarks/results/tuning.md), the
    library's own defaults where MTA's settings are concerned.
    `mta.presets.preset(BenchConfig(task), task)` adds what the per-task stages changed (as `mta bench` does).
    """

    task: str
    base_model: str = DEFAULT_MODEL
    embedding_model: str = DEFAULT_EMBEDDER
    methods: list[str] = field(default_factory=lambda: list(BENCH_METHODS))
    num_retrieved: int = 1
    decoding: Decoding = field(default_factory=Decoding)  # every method alike
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    lora: LoraSpec = field(default_factory=LoraSpec)  # rank 8: the bank's anchors and the per-user LoRA alike
    bank_train: TrainConfig = field(default_factory=anchor_training)
    user_lora_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3.0, learning_rate=2e-3))  # tuned
    fusion: FusionConfig = field(default_factory=FusionConfig)  # mta
    # merge-only, tuned on its own: a task may start MTA's stack from another fusion than merge-only's best
    merge_only: FusionConfig = field(default_factory=FusionConfig)
    stack: StackConfig = field(default_factory=StackConfig)  # mta
    # stack-only, tuned on its own: from the base model a rank-2 LoRA needs 3 epochs at 1e-2 (benchmarks/results/tuning.md)
    stack_only: StackConfig = field(default_factory=lambda: StackConfig(
        top_layers=None, train=TrainConfig(epochs=3.0, learning_rate=1e-2)))
    # recipe: the published rank-4 stack; its schedule is tuned for it on its own (the task-recipe stage)
    recipe_stack: StackConfig = field(default_factory=lambda: StackConfig(rank=4))
    limit_users: int | None = None  # a quick check: at most this many bank users and eval users
    # LaMP's own protocol: every eval user personalized from their whole profile, scored on their query
    full_profile: bool = True
    # history-size curves: per size n, every eval user personalized from n of their profile items (a seeded choice,
    # the same for every method, the smaller sizes' items among the larger ones') and scored on their query and
    # every other profile item (mta.bench.history_split)
    history_sizes: list[int] = field(default_factory=list)
    history_seed: int = 0
    # bank-size curve: banks from nested seeded shares of the bank users; the methods with a bank run on each at the
    # smallest history size (or the full profile), the others once (mta.bench.bank_subsets)
    bank_fractions: list[float] = field(default_factory=list)
    # build the bank without the bank users who share an item with an eval user (mta.bench.without_shared_items)
    bank_without_shared: bool = False

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in BENCH_METHODS]
        require(bool(self.methods) and not unknown, f"unknown method(s) {unknown}; known: {', '.join(BENCH_METHODS)}")
        at_least("retrieved history items", self.num_retrieved, 0)
        require(self.limit_users is None or (isinstance(self.limit_users, int) and self.limit_users >= 1),
                f"limit users must be at least 1, got {self.limit_users!r}")
        for n in self.history_sizes:
            at_least("history size", n, 1)
        require(len(set(self.history_sizes)) == len(self.history_sizes), f"history sizes repeat: {self.history_sizes}")
        for f in self.bank_fractions:
            require(isinstance(f, (int, float)) and 0 < f <= 1, f"bank fractions must lie in (0, 1], got {f!r}")
        require(len(set(self.bank_fractions)) == len(self.bank_fractions), f"bank fractions repeat: {self.bank_fractions}")
        require(self.full_profile or bool(self.history_sizes), "with no full-profile run, give history sizes to run")


@dataclass
class ServeConfig:
    fusion: FusionConfig = field(default_factory=FusionConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    num_retrieved: int | None = None  # history items retrieved into each prompt; None: the bank's setting
    decoding: Decoding = field(default_factory=Decoding)
    max_batch: int = 8
    max_queue: int = 64  # rows waiting beyond this answer 503
    max_wait_ms: float = 5.0  # how long a lone row waits for company before running
    max_new_tokens: int = 128  # ceiling on a request's max_new_tokens
    max_prompt_tokens: int = 384  # longer prompts lose their middle (mta.training.fit), as in training
    max_input_chars: int = 8_000  # longer inputs answer 413
    max_profile_items: int = 1_000
    max_body_bytes: int = 2 << 20
    cache_size: int = 256  # prepared adapters kept in memory
    keep_finished_jobs: int = 1_000  # finished adapt jobs still answered by GET /v1/jobs/{id}
    # a running job's server renews its lease in the store; a job whose lease ran out (its server died) reports failed
    job_lease_s: float = 30.0

    def __post_init__(self):
        require(self.num_retrieved is None or (isinstance(self.num_retrieved, int) and self.num_retrieved >= 0),
                f"retrieved history items must be 0 or more, got {self.num_retrieved!r}")
        for name in ("max_batch", "max_queue", "max_new_tokens", "max_input_chars", "max_profile_items", "max_body_bytes",
                     "cache_size", "keep_finished_jobs"):
            at_least(name.replace("_", " "), getattr(self, name), 1)
        at_least("max prompt tokens", self.max_prompt_tokens, MIN_MAX_LENGTH)
        require(math.isfinite(self.max_wait_ms) and self.max_wait_ms >= 0, f"max wait must be 0 ms or more, got {self.max_wait_ms!r}")
        positive("job lease (seconds)", self.job_lease_s)
