"""Every setting of a training peer in one place, and the model sizes for training from scratch."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from swarmlm.model.config import ModelConfig

WIRE_FORMATS = ("fp16", "fp32", "int8")  # how pseudo-gradients / gradients travel (codecs: allreduce.py)

# hidden, layers, heads, kv heads, MLP width. "tiny" trains in minutes on two CPU cores.
PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (128, 4, 4, 2, 384),
    "small": (256, 6, 8, 4, 768),
    "base": (576, 12, 9, 3, 1536),
}


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


@dataclass
class TrainConfig:
    data: Path  # a folder written by `swarmlm data prepare` (this peer's own data: it never leaves the peer)
    run_dir: Path  # checkpoints, the round log and exports of this peer
    run_id: str = "swarmlm-train"  # peers with the same run id train together
    # Model: a preset size trained from scratch, or a checkpoint (GGUF / HF directory) to fine-tune.
    size: str = "tiny"
    model: str | None = None
    lora_rank: int = 0  # > 0: train LoRA adapters only (peft); only they travel
    seed: int = 0  # initial weights of a from-scratch model: every peer of a run must use the same
    # Data
    data_part: tuple[int, int] | None = None  # (rank, world): train on every world-th block from rank
    batch_size: int = 8
    # DiLoCo
    mode: str = "diloco"  # diloco | ddp (synchronous data-parallel: gradients averaged every step)
    inner_steps: int = 50  # H
    inner_lr: float = 1e-3
    warmup_steps: int = 20
    # Cosine decay of the inner learning rate over the run (`rounds * inner_steps` steps) down to this
    # fraction of it; 1.0 keeps it constant. Measured by the global round, so a latecomer decays in step.
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    rounds: int = 10  # stop after this global round (ddp: rounds of `inner_steps` steps)
    # Averaging
    initial_peers: list[str] = field(default_factory=list)
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    identity: str | None = None
    swarm_cert: str | None = None  # membership certificate: train in a private swarm
    target_group_size: int = 4
    # A fresh run (round 0) waits at its first round until this many peers (itself included) are in it,
    # for at most `start_wait` seconds: peers started by hand, a minute apart, then average from round 1
    # instead of the first training alone. 1: start at once.
    min_peers: int = 2
    start_wait: float = 60.0
    min_group_size: int = 1  # a round completes with whoever is there, alone included
    aggregation: str = "mean"  # mean | trimmed_mean | centered_clip
    # fp16 | fp32 | int8 on the wire; None: fp16 for DiLoCo's pseudo-gradients, fp32 for DDP's per-step
    # gradients (fp16 without loss scaling rounds their small entries away: bench/train_bench.py).
    wire: str | None = None
    matchmaking_time: float = 2.0  # seconds a round waits for peers to join its group (less if it fills)
    averaging_timeout: float = 60.0  # give up on a round's averaging after this long (progress is kept)
    patience: int = 5  # rounds in a row without a group before the peer gives up (exit code 3)
    # Differential privacy (off unless dp_noise is set)
    dp_clip: float = 1.0
    dp_noise: float | None = None
    dp_delta: float | None = None
    # Evaluation and bookkeeping
    eval_blocks: int = 64
    keep_checkpoints: int = 3
    metrics_port: int | None = None
    # Fault injection for tests and benchmarks: this peer sends a poisoned update ("sign_flip" or "noise").
    byzantine: str | None = None
    byzantine_scale: float = 10.0

    def __post_init__(self) -> None:
        if self.mode not in ("diloco", "ddp"):
            raise ValueError(f"mode must be diloco or ddp, not {self.mode!r}")
        if not re.fullmatch(r"[\w-]+", self.run_id):  # it prefixes DHT keys, and hivemind's separator is "."
            raise ValueError(f"--run-id {self.run_id!r}: use letters, digits, '_' and '-' only")
        if self.inner_steps < 1 or self.rounds < 1 or self.batch_size < 1:
            raise ValueError("--inner-steps, --rounds and --batch-size must be positive")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("--min-lr-ratio must be between 0 and 1")
        if self.wire is None:
            self.wire = "fp32" if self.mode == "ddp" else "fp16"
        if self.wire not in WIRE_FORMATS:
            raise ValueError(f"--wire must be one of {', '.join(WIRE_FORMATS)}, not {self.wire!r}")
        if self.min_group_size < 1:
            raise ValueError("--min-group-size must be at least 1")
        if self.min_peers < 1 or self.start_wait < 0:
            raise ValueError("--min-peers must be at least 1 and --start-wait not negative")
        if self.dp_noise is not None and self.dp_delta is None:
            raise ValueError("differential privacy needs --dp-delta: epsilon is meaningless without it")
        if self.byzantine not in (None, "sign_flip", "noise"):
            raise ValueError(f"byzantine must be sign_flip or noise, not {self.byzantine!r}")
        if self.data_part is not None and not 0 <= self.data_part[0] < self.data_part[1]:
            raise ValueError(f"--data-part {self.data_part[0]}/{self.data_part[1]}: need 0 <= rank < world")
