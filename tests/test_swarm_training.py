"""Fine-tuning through the swarm: backward passes through real peer processes, against one process."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from openai import NotFoundError, OpenAI
from peft import PeftModel

from swarmlm.launch.peers import PeerProcess, free_port, stop_all
from swarmlm.launch.peft_twin import PeftTwin, peft_name
from swarmlm.model.loading import LoadedModel
from swarmlm.swarm.client import ClientConfig, RemoteModel
from swarmlm.swarm.grad_messages import GradRequest
from swarmlm.swarm.messages import RemoteError
from swarmlm.swarm.routing import NoRouteError
from tests.test_adapters import peft_greedy

pytestmark = pytest.mark.slow

TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
    "arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them."
)


@pytest.fixture(scope="module")
def swarm() -> Iterator[dict[str, PeerProcess]]:
    """SmolLM2 on three peers of 10 layers, and a second peer for the middle span (failover)."""
    peers: dict[str, PeerProcess] = {}
    try:
        peers["a"] = PeerProcess("--layers", "0:10").wait_address()
        boot = peers["a"].maddr
        for name, layers in (("b", "10:20"), ("c", "20:30"), ("d", "10:20")):
            peers[name] = PeerProcess("--layers", layers, initial=boot)
        for peer in peers.values():
            peer.wait_ready()
        yield peers
    finally:
        stop_all(list(peers.values()))


@pytest.fixture(scope="module")
def remote(swarm: dict[str, PeerProcess]) -> Iterator[RemoteModel]:
    # The default 15 s bans: a live peer's transient failure (a stream cut short on a loaded machine) must
    # not leave a span without a route for the rest of the module, as a 300 s ban once did.
    config = ClientConfig(wire_dtype="fp32", step_timeout=30)
    with RemoteModel(initial_peers=[swarm["a"].maddr], config=config) as client:
        yield client


def batches(model: LoadedModel, rows: int, length: int, steps: int) -> list[torch.Tensor]:
    ids = torch.tensor(model.tokenizer.encode(TEXT))
    return [torch.stack([ids[s + r : s + r + length] for r in range(rows)]) for s in range(steps)]


def test_prompt_tuning_and_lora_through_the_swarm_match_one_process(
    remote: RemoteModel, swarm: dict[str, PeerProcess], model: LoadedModel, tmp_path: Path
) -> None:
    tuned = remote.fine_tuning(prompt_tokens=4, lora_rank=4, seed=1)
    twin = PeftTwin(model.span, tuned)
    twin_params = twin.params
    assert len(twin_params) == len(tuned.trainable_parameters())
    optimizer = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    twin_optimizer = torch.optim.AdamW(twin_params, lr=1e-2)
    failovers = remote.stats.failovers
    data = batches(model, rows=2, length=12, steps=4)
    for step, ids in enumerate(data):
        loss = tuned.loss(ids)
        if step == 2:  # a peer of this step's route dies between its forward and its backward pass
            victim = next(swarm[n] for n in ("b", "d") if swarm[n].peer_id in tuned.body.last_peers)
            victim.crash()
        loss.backward()
        twin_loss = twin.loss(ids)
        twin_loss.backward()
        assert abs(loss.item() - twin_loss.item()) < 1e-4, (step, loss.item(), twin_loss.item())
        # Each step's gradients, to float error at each tensor's scale: the two sum in other orders (fused
        # qkv LoRA here, peft's separate q, k, v there; other kernels on another CPU), and through 30 layers
        # that reached 7.6e-4 of a tensor's largest gradient (an AVX-512 machine); a wrong gradient is off
        # by its whole scale. The weights after AdamW are not compared elementwise: its update divides by
        # the root of tiny second moments, which makes float error in a near-zero gradient visible.
        for ours, theirs in zip(tuned.trainable_parameters(), twin_params, strict=True):
            assert ours.grad is not None and theirs.grad is not None
            scale = theirs.grad.abs().max().item()
            torch.testing.assert_close(ours.grad, theirs.grad, atol=5e-3 * scale, rtol=1e-3)
        for opt in (optimizer, twin_optimizer):
            opt.step()
            opt.zero_grad()
    assert remote.stats.failovers > failovers  # the backward pass went around the dead peer
    assert victim.peer_id not in tuned.body.last_peers

    # The adapters save as a peft adapter that peft itself loads.
    tuned.save_adapter(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(copy.deepcopy(model.span).float(), str(tmp_path / "adapter"))
    named = dict(loaded.named_parameters())
    for name, value in tuned.adapters().items():
        torch.testing.assert_close(named[peft_name(name)], value.detach())


def o_proj_pair(name: str, rank: int) -> dict[str, torch.Tensor]:
    """A well-shaped o_proj adapter pair of `rank` (576 features in and out)."""
    return {name + "A": torch.zeros(rank, 576), name + "B": torch.zeros(576, rank)}


def test_training_passes_refuse_bad_requests_clearly(remote: RemoteModel, swarm: dict[str, PeerProcess]) -> None:
    body = remote.fine_tuning().body
    peer = swarm["a"].peer_id  # layers 0:10
    hidden = torch.zeros(1, 3, 576)

    def refusal(request: GradRequest) -> str:
        with pytest.raises(RemoteError) as e:
            remote.manager.run(body.send(peer, request), 30)
        return str(e.value)

    model_id = remote.model_id
    assert "layers 0:10, not" in refusal(GradRequest(model_id, 5, 15, hidden))
    assert "expected hidden states" in refusal(GradRequest(model_id, 0, 10, torch.zeros(3, 576)))
    grad = torch.zeros(1, 2, 576)
    assert "output gradient" in refusal(GradRequest(model_id, 0, 10, hidden, grad))
    a = torch.zeros(4, 576)
    name = "layers.3.self_attn.o_proj.lora_"
    assert "without its" in refusal(GradRequest(model_id, 0, 10, hidden, adapters={name + "A": a}))
    wrong_rank = {name + "A": torch.zeros(4, 576), name + "B": torch.zeros(576, 2)}
    assert "has rank 2; its lora_A has rank 4" in refusal(GradRequest(model_id, 0, 10, hidden, adapters=wrong_rank))
    two_ranks = {**o_proj_pair(name, 4), **o_proj_pair("layers.4.self_attn.o_proj.lora_", 2)}
    assert "several ranks ([2, 4])" in refusal(GradRequest(model_id, 0, 10, hidden, adapters=two_ranks))
    wrong_shape = {name + "A": torch.zeros(4, 500), name + "B": torch.zeros(576, 4)}
    assert "needs [rank, 576]" in refusal(GradRequest(model_id, 0, 10, hidden, adapters=wrong_shape))
    outside = {n.replace("layers.3", "layers.12"): t for n, t in wrong_shape.items()}
    assert "outside layers 0:10" in refusal(GradRequest(model_id, 0, 10, hidden, adapters=outside))


def test_a_peer_without_gradients_refuses_and_is_not_routed_through(tiny_llama: Path) -> None:
    only = PeerProcess("--model", str(tiny_llama), "--layers", "0:4", "--no-gradients").wait_ready()
    try:
        with RemoteModel(str(tiny_llama), initial_peers=[only.maddr], config=ClientConfig(route_timeout=2)) as client:
            tuned = client.fine_tuning(prompt_tokens=2)
            with pytest.raises(NoRouteError):
                tuned.loss(torch.tensor([[1, 2, 3, 4]]))
            request = GradRequest(client.model_id, 0, 4, torch.zeros(1, 2, 64), torch.zeros(1, 2, 64))
            with pytest.raises(RemoteError, match="--no-gradients"):
                client.manager.run(tuned.body.send(only.peer_id, request), 30)
    finally:
        only.stop()


def test_an_adapter_trained_through_the_swarm_is_served_by_peers_that_hold_it(
    remote: RemoteModel, swarm: dict[str, PeerProcess], model: LoadedModel, tmp_path: Path
) -> None:
    tuned = remote.fine_tuning(lora_rank=4, seed=2)
    optimizer = torch.optim.AdamW(tuned.trainable_parameters(), lr=2e-2)
    for ids in batches(model, rows=2, length=12, steps=3):
        tuned.loss(ids).backward()
        optimizer.step()
        optimizer.zero_grad()
    tuned.save_adapter(tmp_path / "tuned")
    api = f"127.0.0.1:{free_port()}"
    holder = PeerProcess(
        "--layers",
        "0:30",
        "--adapters",
        f"tuned={tmp_path / 'tuned'}",
        "--api",
        api,
        "--wire-dtype",
        "fp32",
        initial=swarm["a"].maddr,
    )
    try:
        holder.wait_ready()
        client = OpenAI(base_url=f"http://{api}/v1", api_key="none", max_retries=0, timeout=120)
        name = f"{remote.model_id}:tuned"
        deadline = time.monotonic() + 30  # the gateway sees the adapter once the peer's record is in the DHT
        while name not in [m.id for m in client.models.list().data]:
            assert time.monotonic() < deadline, "the gateway never listed the adapter"
            time.sleep(1)

        def complete(model_name: str) -> str:
            return (
                client.completions.create(model=model_name, prompt=TEXT[:40], max_tokens=8, temperature=0)
                .choices[0]
                .text
            )

        with ThreadPoolExecutor(4) as pool:  # adapter and base requests in the same steps
            texts = list(pool.map(complete, [name, remote.model_id, name, remote.model_id]))
        prompt = model.tokenizer.encode(TEXT[:40])
        assert texts[0] == texts[2] == peft_greedy(model, tmp_path / "tuned", prompt, 8)
        assert texts[1] == texts[3] == peft_greedy(model, None, prompt, 8)
        assert texts[0] != texts[1]
        with pytest.raises(NotFoundError):
            client.completions.create(model=f"{remote.model_id}:other", prompt="Hi", max_tokens=2)
    finally:
        holder.stop()
