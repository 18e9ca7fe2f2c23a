"""Every setting of a training peer in one place, and the model sizes for training from scratch."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from swarmlm.core.settings import LOCALHOST_MADDRS, setting
from swarmlm.model.model_config import ModelConfig

WIRE_FORMATS = ("fp16", "fp32", "int8")  # how pseudo-gradients / gradients travel (codecs: allreduce.py)

# hidden, layers, heads, kv heads, MLP width. "tiny" trains in minutes on two CPU cores.
PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (128, 4, 4, 2, 384),
    "small": (256, 6, 8, 4, 768),
    "base": (576, 12, 9, 3, 1536),
    "135m": (576, 30, 9, 3, 1536),  # SmolLM2-135M's shape
    "1.7b": (2048, 24, 32, 32, 8192),  # SmolLM2-1.7B's shape
}
# names of swarmlm.model.loading.DTYPES a trainer may hold its weights in (no torch import: the CLI parses
# options without loading torch)
TRAIN_DTYPES = ("fp32", "bf16")


def preset_config(name: str, vocab_size: int, context: int, eos_token_id: int | None) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model size {name!r}: choose one of {', '.join(PRESETS)}")
    hidden, layers, heads, kv_heads, mlp = PRESETS[name]
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hidden // heads,
        # Rotary positions have no table to outgrow: a longer limit than the training blocks lets a
        # served model take longer prompts (with quality fading past what it was trained on).
        max_position_embeddings=max(context, 2048),
        tie_word_embeddings=True,
        bos_token_id=eos_token_id,
        eos_token_ids=(eos_token_id,) if eos_token_id is not None else (),
    )


def parse_part(value: str) -> tuple[int, int]:
    """'RANK/WORLD' -> (rank, world). Raises ValueError with a message for the user."""
    try:
        rank, world = (int(x) for x in value.split("/"))
    except ValueError:
        raise ValueError("give RANK/WORLD, e.g. 0/3") from None
    return rank, world


@dataclass
class TrainConfig:
    data: Path = setting(help="A folder written by `swarmlm data prepare` (this peer's own: it never leaves it)")
    run_dir: Path = setting(help="This peer's checkpoints, round log and exports (resumed if present)")
    run_id: str = setting("swarmlm-train", help="Peers with the same run id train together")
    # Model: a preset size trained from scratch, or a checkpoint (GGUF / HF directory) to fine-tune.
    size: str = setting("tiny", help="Model size from scratch", choices=tuple(PRESETS))
    model: str | None = setting(None, help="Fine-tune this .gguf / HF directory instead")
    lora_rank: int = setting(0, help="> 0: train LoRA adapters of this rank only (peft); only they travel")
    seed: int = setting(0, help="Initial weights' seed (the same on every peer of a run)")
    dtype: str = setting(
        "fp32",
        help="Weights, gradients and optimizer state in fp32, or bf16 (half the memory; an update below bf16's "
        "precision is lost)",
        choices=TRAIN_DTYPES,
    )
    pipeline_stages: int = setting(
        0,
        help="> 0: split the model into this many stages across peers (SWARM pipeline training); this peer "
        "trains the stage fewest peers hold and averages with that stage's peers",
    )
    # Data
    data_part: tuple[int, int] | None = setting(
        None, help="RANK/WORLD: train on every WORLD-th block from RANK only", parse=parse_part, metavar="RANK/WORLD"
    )
    batch_size: int = setting(8, help="Sequences per inner step")
    # DiLoCo
    mode: str = setting("diloco", help="diloco, or ddp (average gradients every step: the baseline)")
    inner_steps: int = setting(50, help="H: local optimizer steps per round")
    optimizer: str = setting(
        "adamw",
        help="Inner optimizer: adamw, or adafactor (factored second moments: next to no state, for peers "
        "short of memory)",
        choices=("adamw", "adafactor"),
    )
    inner_lr: float = setting(1e-3, help="Inner learning rate")
    warmup_steps: int = setting(20, help="Inner steps of linear learning-rate warmup")
    # Measured by the global round, so a latecomer decays in step.
    min_lr_ratio: float = setting(
        0.1, help="Cosine-decay the inner learning rate over the run to this fraction (1: constant)"
    )
    weight_decay: float = setting(0.1, help="Inner AdamW weight decay")
    outer_lr: float = setting(0.7, help="Outer (Nesterov SGD) learning rate on the averaged pseudo-gradient")
    outer_momentum: float = setting(0.9, help="Outer Nesterov momentum")
    rounds: int = setting(10, help="Stop when the swarm reaches this round (ddp: rounds of --inner-steps steps)")
    # Averaging
    initial_peers: list[str] = setting(help="Multiaddr of any peer already in the run (repeatable)", factory=list)
    host_maddrs: list[str] = setting(help="Where to listen (repeatable)", factory=lambda: list(LOCALHOST_MADDRS))
    identity: str | None = setting(None, help="Private key file: a stable peer id")
    swarm_cert: str | None = setting(
        None, help="Membership certificate (`swarmlm swarm invite`): train in a private swarm"
    )
    target_group_size: int = setting(4, help="Peers expected in a round's group")
    # Peers started by hand, a minute apart, then average from round 1 instead of the first training alone.
    min_peers: int = setting(
        2, help="A fresh run waits at round 1 for this many peers, itself included (1: start at once)"
    )
    start_wait: float = setting(60.0, help="Most seconds a fresh run waits for --min-peers; then it trains")
    min_group_size: int = setting(1, help="Fewest peers a round averages with (1: alone too)")
    aggregation: str = setting("mean", help="mean, trimmed_mean or centered_clip")
    # fp16 without loss scaling rounds DDP's small per-step gradients away (bench/RESULTS.md, train).
    wire: str | None = setting(None, help="fp16, fp32 or int8 on the wire (default: fp16 for diloco, fp32 for ddp)")
    matchmaking_time: float = setting(2.0, help="Seconds a round waits for its group to fill (less if it fills)")
    averaging_timeout: float = setting(60.0, help="Give up a round's averaging after this (progress is kept)")
    patience: int = setting(5, help="Rounds in a row without a group before giving up (exit 3)")
    # A straggler's matchmaking attempt (3 x --matchmaking-time) must find us still there.
    linger: float | None = setting(
        None,
        help="Seconds to stay after the last round, for late joiners to download it "
        "(default: 4 x --matchmaking-time + 2; longer while a peer of the run is still behind)",
    )
    # Differential privacy (off unless dp_noise is set)
    dp_clip: float = setting(1.0, help="DP: clip each round's update to this L2 norm")
    dp_noise: float | None = setting(None, help="DP: Gaussian noise multiplier (turns DP on)")
    dp_delta: float | None = setting(None, help="DP: delta of the (epsilon, delta) reported")
    # Evaluation and bookkeeping
    eval_blocks: int = setting(64, help="Validation blocks evaluated after each round")
    keep_checkpoints: int = setting(3, help="Newest round checkpoints kept (the best one is kept too)")
    metrics_port: int | None = setting(None, help="Serve Prometheus metrics on this port")
    # Fault injection for tests and benchmarks: this peer sends a poisoned update.
    byzantine: str | None = setting(None, help="Fault injection for tests: send poisoned updates (sign_flip or noise)")
    byzantine_scale: float = setting(10.0, help="Fault injection: the size of the poisoned updates")

    def __post_init__(self) -> None:
        if self.mode not in ("diloco", "ddp"):
            raise ValueError(f"mode must be diloco or ddp, not {self.mode!r}")
        if not re.fullmatch(r"[\w-]+", self.run_id):  # it prefixes DHT keys, and hivemind's separator is "."
            raise ValueError(f"--run-id {self.run_id!r}: use letters, digits, '_' and '-' only")
        if self.inner_steps < 1 or self.rounds < 1 or self.batch_size < 1:
            raise ValueError("--inner-steps, --rounds and --batch-size must be positive")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("--min-lr-ratio must be between 0 and 1")
        if self.dtype not in TRAIN_DTYPES or self.optimizer not in ("adamw", "adafactor"):
            raise ValueError(f"--dtype {self.dtype!r} / --optimizer {self.optimizer!r}: see --help for the choices")
        if self.mode == "ddp" and self.optimizer != "adamw":
            raise ValueError("--mode ddp shares the AdamW moments: --optimizer adamw")
        if self.wire is None:
            self.wire = "fp32" if self.mode == "ddp" or self.dtype == "bf16" else "fp16"
        if self.wire not in WIRE_FORMATS:
            raise ValueError(f"--wire must be one of {', '.join(WIRE_FORMATS)}, not {self.wire!r}")
        if self.dtype == "bf16" and self.wire != "fp32":  # hivemind's fp16 and int8 codecs take no bf16
            raise ValueError("--dtype bf16 averages its tensors as they are: --wire fp32 (bf16 bytes, uncompressed)")
        if self.linger is None:
            self.linger = 4 * self.matchmaking_time + 2
        if self.linger < 0:
            raise ValueError("--linger must not be negative")
        if self.min_group_size < 1:
            raise ValueError("--min-group-size must be at least 1")
        if self.min_peers < 1 or self.start_wait < 0:
            raise ValueError("--min-peers must be at least 1 and --start-wait not negative")
        if self.dp_noise is not None and self.dp_delta is None:
            raise ValueError("differential privacy needs --dp-delta: epsilon is meaningless without it")
        if self.byzantine not in (None, "sign_flip", "noise"):
            raise ValueError(f"byzantine must be sign_flip or noise, not {self.byzantine!r}")
        if self.pipeline_stages < 0:
            raise ValueError("--pipeline-stages must not be negative")
        if self.pipeline_stages and (self.model is not None or self.lora_rank or self.mode != "diloco"):
            raise ValueError(
                "--pipeline-stages trains a model from scratch (--size) with DiLoCo; to fine-tune a model split "
                "across peers use RemoteModel.fine_tuning"
            )
        if self.data_part is not None and not 0 <= self.data_part[0] < self.data_part[1]:
            raise ValueError(f"--data-part {self.data_part[0]}/{self.data_part[1]}: need 0 <= rank < world")


@dataclass(frozen=True)
class PrepareConfig:
    """`swarmlm data prepare`'s settings (train/data/pipeline.py)."""

    tokenizer: str | None = setting(None, help="Tokenize with this model's tokenizer (default: embedded SmolLM2)")
    train_tokenizer: int | None = setting(
        None, help="Train a byte-level BPE of this vocabulary size on the corpus instead"
    )
    block_size: int = setting(256, help="Tokens per block (training sequence)")
    val_fraction: float = setting(0.05, help="Share of blocks held out for validation")
    shard_blocks: int = setting(4096, help="Most blocks per shard file")
    seed: int = setting(0, help="Seed of the train/validation split")
    strict: bool = setting(
        False, help="Stop (exit code 2) at a file that is not text instead of skipping it and listing it"
    )
    encoding: str | None = setting(None, help="Decode every file with this encoding (default: detect each file's)")
