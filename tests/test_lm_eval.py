"""lm-evaluation-harness, a client nobody here wrote, scores the embedded model through `swarmlm serve`
and through a swarm gateway (`local-completions`: prompt logprobs by `echo`, its remote tokenizer by
/tokenize), and its scores equal those of its own `hf` backend on the same weights in this process: a
multiple-choice task (loglikelihood accuracy), a perplexity task (loglikelihood_rolling) and a
generate-until task, defined in local task YAMLs over local JSON lines (nothing downloaded)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from swarmlm.launch.peers import PeerProcess, free_port, start_swarm, stop_all
from swarmlm.launch.servers import ServerProcess
from swarmlm.model.loading import LoadedModel
from tests.lm_eval_tasks import TASKS, write_tasks

pytestmark = pytest.mark.slow


def evaluate(model: str, model_args: str, tasks: Path) -> dict[str, dict[str, Any]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model=model, model_args=model_args, tasks=list(TASKS), task_manager=TaskManager(include_path=str(tasks))
    )
    assert out is not None
    return out["results"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, model: LoadedModel) -> Iterator[tuple[Path, Path, dict]]:
    """The embedded model as an HF folder (what the `hf` backend reads and swarmlm serves), the tasks, and
    the `hf` backend's scores."""
    root = tmp_path_factory.mktemp("lm-eval")
    weights, tasks = root / "SmolLM2-135M-Instruct", root / "tasks"
    tasks.mkdir()
    model.save_hf(weights)
    write_tasks(tasks)
    with pytest.MonkeyPatch.context() as env:  # nothing of lm-eval's reaches for the hub
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("HF_DATASETS_OFFLINE", "1")
        yield weights, tasks, evaluate("hf", f"pretrained={weights},dtype=float32,device=cpu,batch_size=1", tasks)


def assert_same_scores(got: dict[str, dict[str, Any]], want: dict[str, dict[str, Any]]) -> None:
    for task, metrics in want.items():
        for name, value in metrics.items():
            if isinstance(value, float) and "stderr" not in name:
                assert got[task][name] == pytest.approx(value, rel=1e-3, abs=1e-3), (task, name)
    assert want["swarmlm_choice"]["acc,none"] >= 0.5  # the embedded model knows some of it: a real score
    assert want["swarmlm_completion"]["exact_match,none"] > 0


def local_completions(base: str, model_id: str) -> str:
    return f"model={model_id},base_url={base}/v1/completions,num_concurrent=1,max_retries=1,tokenized_requests=True"


def test_scores_through_swarmlm_serve_equal_the_hf_backend(setup: tuple[Path, Path, dict]) -> None:
    weights, tasks, want = setup
    server = ServerProcess("--model", str(weights))
    try:
        server.wait_ready()
        got = evaluate("local-completions", local_completions(server.base, weights.name), tasks)
    finally:
        server.stop()
    assert_same_scores(got, want)


def test_scores_through_a_swarm_gateway_equal_the_hf_backend(setup: tuple[Path, Path, dict]) -> None:
    """Two peers split the layers; the gateway sends fp32 between them (`--wire-dtype fp32`)."""
    weights, tasks, want = setup
    peers = start_swarm(["0:15", "15:30"], extra=("--model", str(weights)))
    try:
        api = f"127.0.0.1:{free_port()}"
        args = ("--model", str(weights), "--layers", "none", "--api", api, "--wire-dtype", "fp32")
        peers.append(PeerProcess(*args, initial=peers[0].maddr, threads=None).wait_ready())
        got = evaluate("local-completions", local_completions(f"http://{api}", weights.name), tasks)
    finally:
        stop_all(peers)
    assert_same_scores(got, want)
