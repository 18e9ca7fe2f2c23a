"""The inner optimizer: AdamW (or Adafactor, `--optimizer`) on a peer's local weights, its learning-rate
schedule, and its steps.

In DiLoCo each peer's AdamW state is its own. In DDP mode every peer takes the same steps, so the moments
are part of what peers hold in common and travel to a newcomer (`moments`, `live_moments`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from swarmlm.train.checkpointer import flatten_optimizer, restore_optimizer
from swarmlm.train.train_config import TrainConfig


class InnerOptimizer:
    def __init__(self, params: list[torch.nn.Parameter], cfg: TrainConfig) -> None:
        self.params = params
        self.optimizer: torch.optim.Optimizer = (
            # fused: one pass over each tensor with no temporaries; torch's default on CPU (one tensor at a
            # time) allocates two temporaries the size of each tensor: 0.2 GB more at the peak for a
            # 49,152 x 576 embedding, and steps 6x slower
            torch.optim.AdamW(params, lr=cfg.inner_lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay, fused=True)
            if cfg.optimizer == "adamw"
            # Adafactor keeps a row and a column of second moments per matrix, no first moment: a stage's
            # optimizer state is a few MB where AdamW's is twice its weights.
            else torch.optim.Adafactor(params, lr=cfg.inner_lr, weight_decay=cfg.weight_decay)
        )
        self.steps_done = 0  # by this peer, across rounds and restarts

    def schedule(self, cfg: TrainConfig, round_: int, step_in_round: int) -> None:
        """Linear warmup over this peer's first steps (in DiLoCo its AdamW state starts empty, even when it
        joins late; in DDP every peer shares one optimizer state, so one schedule), times cosine decay over
        the run's global progress. `cfg` is read afresh: the Python API may change it between fits."""
        global_step = round_ * cfg.inner_steps + step_in_round
        warm_steps = global_step if cfg.mode == "ddp" else self.steps_done
        warm = min(1.0, (warm_steps + 1) / max(1, cfg.warmup_steps))
        progress = min(1.0, global_step / (cfg.rounds * cfg.inner_steps))
        decay = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.inner_lr * warm * decay

    def step(self) -> None:
        """Clip the gradients' norm to 1 and step."""
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.zero_grad()
        self.steps_done += 1

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def moments(self) -> list[Tensor]:
        """Per parameter: its AdamW first and second moments and step count."""
        state = []
        for p in self.params:
            s = self.optimizer.state.get(p, {})
            step = torch.tensor(float(s.get("step", 0)))
            state += [
                s.get("exp_avg", torch.zeros_like(p)).clone(),
                s.get("exp_avg_sq", torch.zeros_like(p)).clone(),
                step,
            ]
        return state

    def live_moments(self) -> list[Tensor]:
        """`moments`' tensors themselves, for a download to write into: made first, as AdamW would at its
        first step, where it has not stepped yet."""
        state = []
        for p in self.params:
            s = self.optimizer.state[p]
            if not s:
                s.update(
                    step=torch.zeros((), dtype=torch.float32),
                    exp_avg=torch.zeros_like(p),
                    exp_avg_sq=torch.zeros_like(p),
                )
            state += [s["exp_avg"], s["exp_avg_sq"], s["step"]]
        return state

    def state_dict(self) -> dict[str, Any]:
        return flatten_optimizer("inner", self.optimizer) | {"inner_steps_done": self.steps_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_optimizer("inner", self.optimizer, state)
        self.steps_done = int(state["inner_steps_done"])
