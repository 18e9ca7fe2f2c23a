"""`swarmlm eval RUN --tasks ...`: a finished run's best model scored by lm-evaluation-harness, on any of
its tasks or on tasks of one's own (`--include-path`: a folder of task YAMLs).

The best round is exported to a temporary HF folder (what `swarmlm export` writes) and read by lm-eval's
`hf` backend in fp32 on the CPU: the same numbers its `local-completions` client gets from that folder
served by `swarmlm serve` or a swarm gateway (tests/test_lm_eval.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from swarmlm.train.data import load_data_tokenizer
from swarmlm.train.evaluation import load_run_model


def run_harness(checkpoint: Path, tasks: list[str], include_path: Path | None, limit: int | None) -> int:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ValueError("--tasks runs lm-evaluation-harness: pip install 'lm-eval[api]'") from e
    if include_path is not None and not include_path.is_dir():
        raise ValueError(f"--include-path {include_path}: not a folder of task YAMLs")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    if unknown := [t for t in tasks if t not in manager.all_tasks]:
        raise ValueError(f"unknown lm-eval task {unknown[0]!r} (give --include-path for tasks of your own)")
    model, meta = load_run_model(checkpoint)
    with tempfile.TemporaryDirectory(prefix="swarmlm-eval-") as folder:
        model.export_hf(Path(folder), load_data_tokenizer(Path(meta["model"]["data"])))
        del model
        args = f"pretrained={folder},dtype=float32,device=cpu,batch_size=1"
        out = simple_evaluate(model="hf", model_args=args, tasks=tasks, task_manager=manager, limit=limit)
    assert out is not None
    print(f"round {meta['round']}:")
    for line in _lines(out["results"]):
        print(line)
    return 0


def _lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """`task metric=value` for each score (lm-eval's stderr beside it where it gave one)."""
    lines = []
    for task, metrics in sorted(results.items()):
        for name, value in metrics.items():
            if isinstance(value, float) and "_stderr" not in name:
                metric = name.split(",")[0]
                stderr = metrics.get(name.replace(",", "_stderr,", 1))
                spread = f" ± {stderr:.4f}" if isinstance(stderr, float) else ""
                lines.append(f"  {task} {metric}={value:.4f}{spread}")
    return lines
