"""The training's parts on their own: aggregation rules, privacy, checkpoints, the robust all-reduce."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from swarmlm.train.aggregation import centered_clip, get_aggregator, mean, trimmed_mean
from swarmlm.train.checkpointer import (
    CheckpointCorrupt,
    latest_checkpoint,
    load_checkpoint,
    mark_best,
    save_checkpoint,
)
from swarmlm.train.privacy import PeerPrivacy
from swarmlm.train.train_config import TrainConfig

if TYPE_CHECKING:
    from hivemind import DHT

    from swarmlm.train.replica import Replica


def honest_and_attacker(n_honest: int, attack: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    honest = 1.0 + 0.1 * torch.randn(n_honest, 1000, generator=gen)
    bad = -10 * honest[0] if attack == "sign_flip" else 50 * torch.randn(1000, generator=gen)
    return honest, torch.cat([honest, bad[None]])


@pytest.mark.parametrize("attack", ["sign_flip", "noise"])
def test_robust_rules_resist_one_attacker_where_the_mean_does_not(attack):
    honest, stack = honest_and_attacker(3, attack)
    target = honest.mean(0)
    weights = torch.ones(len(stack))
    rules = ("mean", "trimmed_mean", "centered_clip")
    err = {name: float((get_aggregator(name)(stack, weights) - target).norm()) for name in rules}
    spread = float((honest - target).norm(dim=1).mean())
    assert err["mean"] > 5 * spread  # one peer moves the mean arbitrarily far
    assert err["trimmed_mean"] < spread
    assert err["centered_clip"] < spread


def test_centered_clip_drops_a_gross_outlier_only_within_its_budget():
    honest, stack = honest_and_attacker(3, "sign_flip")
    w = torch.ones(4)
    # among four, the outlier is dropped: what is left is CenteredClip over the honest three
    assert torch.allclose(centered_clip(stack, w), centered_clip(honest, w[:3]))
    # among three, dropping one would leave no majority to trust: the outlier stays in, clipped to tau
    pair, trio = honest[:2], torch.cat([honest[:2], stack[-1:]])
    pull = float((centered_clip(trio, w[:3]) - pair.mean(0)).norm())
    assert 0 < pull < float((pair[0] - pair[1]).norm())


def test_rules_agree_without_attackers():
    gen = torch.Generator().manual_seed(1)
    stack = torch.randn(4, 500, generator=gen) * 0.01 + 2.0
    w = torch.ones(4)
    exact = stack.mean(0)
    assert torch.allclose(mean(stack, w), exact)
    assert (trimmed_mean(stack, w) - exact).abs().max() < 0.02
    assert (centered_clip(stack, w) - exact).abs().max() < 0.02
    # two contributions cannot be trimmed: the trimmed mean is the mean
    assert torch.allclose(trimmed_mean(stack[:2], w[:2]), stack[:2].mean(0))
    with pytest.raises(ValueError, match="unknown aggregation"):
        get_aggregator("median")


@pytest.mark.parametrize(
    ("option", "named"),
    [
        ({"run_id": "my.run"}, "--run-id"),
        ({"wire": "fp8"}, "--wire"),
        ({"min_group_size": 0}, "--min-group-size"),
        ({"mode": "ddp", "optimizer": "adafactor"}, "--optimizer adamw"),
        ({"dtype": "bf16", "wire": "fp16"}, "--wire fp32"),
    ],
)
def test_a_bad_option_is_named(tmp_path: Path, option: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        TrainConfig(data=tmp_path, run_dir=tmp_path, **option)


def test_privacy_clips_adds_noise_and_accounts():
    with pytest.raises(ValueError, match="delta"):
        PeerPrivacy(clip=1.0, noise_multiplier=1.0, delta=None)
    dp = PeerPrivacy(clip=0.5, noise_multiplier=0.0, delta=1e-5, seed=0)
    update = [torch.full((100,), 1.0), torch.full((10,), 1.0)]
    norm = dp.privatize_(update)
    assert norm == pytest.approx(math.sqrt(110), rel=1e-5)
    assert float(torch.sqrt(sum((t**2).sum() for t in update))) == pytest.approx(0.5, rel=1e-5)

    noisy = PeerPrivacy(clip=0.5, noise_multiplier=1.0, delta=1e-5, seed=0)
    update = [torch.zeros(10_000)]
    noisy.privatize_(update)
    assert float(update[0].std()) == pytest.approx(0.5, rel=0.05)  # noise std = multiplier x clip
    eps1 = noisy.epsilon
    noisy.privatize_([torch.zeros(10)])
    assert 0 < eps1 < noisy.epsilon < math.inf  # epsilon grows with every released round


def test_checkpoints_are_atomic_verified_and_pruned(tmp_path: Path):
    folder = tmp_path / "ckpt"
    for r in range(1, 6):
        save_checkpoint(folder, r, {"w": torch.full((4,), float(r))}, {"position": r}, keep=2)
        if r == 2:
            mark_best(folder, 2, 1.0)
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "best.json",
        "round-000002.json",
        "round-000002.safetensors",
        "round-000004.json",
        "round-000004.safetensors",
        "round-000005.json",
        "round-000005.safetensors",
    ]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left
    tensors, meta = latest_checkpoint(folder)
    assert meta["round"] == 5 and meta["position"] == 5 and float(tensors["w"][0]) == 5.0

    # Corrupt the newest: it is detected, named, and the previous one is used.
    newest = folder / "round-000005.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt, match=r"round-000005.safetensors: checksum mismatch"):
        load_checkpoint(folder / "round-000005.json")
    tensors, meta = latest_checkpoint(folder)
    assert meta["round"] == 4
    (folder / "round-000004.safetensors").unlink()
    assert latest_checkpoint(folder)[1]["round"] == 2


def _join(rank: int, boot: Path) -> DHT:
    """Peer 0 starts a DHT and writes its address to `boot`; the others join through it."""
    import time

    from swarmlm.core.dht import start_dht
    from swarmlm.core.files import atomic_write

    while rank and not boot.exists():
        time.sleep(0.1)
    dht = start_dht([boot.read_text()] if rank else [], ["/ip4/127.0.0.1/tcp/0"])
    if rank == 0:  # whole or not at all: the others read it as soon as it exists
        atomic_write(boot, str(dht.get_visible_maddrs()[0]))
    return dht


def _allreduce_peer(rank: int, rule: str, wire: str, boot_file: str) -> None:
    """One averager of three; run in its own interpreter (a fork of pytest, which ran torch ops, can deadlock)."""
    import time

    from hivemind.averaging.allreduce import AllreduceException
    from hivemind.averaging.matchmaking import MatchmakingException

    from swarmlm.train.allreduce import RobustAverager

    n = 3
    dht = _join(rank, Path(boot_file))
    t = 1.0 + 0.01 * torch.randn(300_000, generator=torch.Generator().manual_seed(rank))
    if rank == n - 1:
        t = -10 * t  # a Byzantine peer
    averager = RobustAverager(
        [t],
        dht,
        aggregation=rule,
        wire=wire,
        prefix="t",
        target_group_size=n,
        min_group_size=n,
        min_matchmaking_time=2.0,
        request_timeout=1.0,
        start=True,
    )
    try:
        gathered = averager.step(timeout=60, allow_retries=False)
    except (AllreduceException, MatchmakingException) as e:  # our side broke: the test runs the trio again
        print(json.dumps({"group": 0, "error": repr(e)}), flush=True)
        gathered = None
    with averager.get_tensors() as (result,):
        digest = hashlib.sha256(result.numpy().tobytes()).hexdigest()
        mean, sent = float(result.mean()), averager.bytes_sent.value
        if gathered is not None:
            print(json.dumps({"group": len(gathered), "digest": digest, "mean": mean, "sent": sent}), flush=True)
    time.sleep(3)  # as `swarmlm train` lingers: a reducer that leaves at once can cut others' last results
    averager.shutdown()
    dht.shutdown()


def _run_trio(peer: str, *args: str, waited: int = 3) -> list[dict]:
    """Three processes running `peer` (a function of this module) with their rank and `args`; the last
    line each of the first `waited` prints."""
    code = f"import sys; from tests.test_train_parts import {peer} as f; f(int(sys.argv[1]), *sys.argv[2:])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(r), *args], stdout=subprocess.PIPE, text=True)
        for r in range(3)
    ]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs[:waited]]
    finally:
        for p in procs:
            p.kill()
    return [json.loads(out.strip().splitlines()[-1]) for out in outputs]


def _broken_allreduce_peer(rank: int, boot_file: str) -> None:
    """Peers 0 and 1 average with peer 2, whose averager dies once it has sent back two of its aggregated
    parts; they write their own values into their tensor again and average as two."""
    import os
    import time

    from hivemind.averaging.allreduce import AllreduceException
    from hivemind.averaging.matchmaking import MatchmakingException
    from hivemind.proto import averaging_pb2

    from swarmlm.train.allreduce import RobustAverager

    class DiesMidway(RobustAverager):
        # Wraps every members-only handler's replies (an rpc_ method's types would be read by hivemind).
        async def _members_only(self, context: Any, replies: AsyncIterator[Any], refusal: Any) -> AsyncIterator[Any]:
            sent = 0
            async for reply in super()._members_only(context, replies, refusal):
                if isinstance(reply, averaging_pb2.AveragingData):
                    if sent == 2:
                        os._exit(0)
                    sent += 1
                yield reply

    DiesMidway.__name__ = RobustAverager.__name__  # hivemind names a servicer's handlers after its class
    dht = _join(rank, Path(boot_file))
    mine = torch.full((300_000,), float(rank + 1))
    kind = DiesMidway if rank == 2 else RobustAverager
    options = {"target_group_size": 3, "min_group_size": 3, "min_matchmaking_time": 2.0, "request_timeout": 1.0}
    options |= {"next_chunk_timeout": 5.0, "allreduce_timeout": 30.0}  # as `swarmlm train` sets them, shorter
    averager = kind([mine.clone()], dht, prefix="b", part_size_bytes=1 << 14, start=True, **options)
    if rank == 2:
        averager.step(timeout=60, allow_retries=False, wait=False)
        time.sleep(120)  # the test kills it
    try:
        averager.step(timeout=40, allow_retries=False)
        first = "averaged"
    except (AllreduceException, MatchmakingException) as e:  # hivemind re-raises the first as the second
        first = repr(e)
    with averager.get_tensors() as (t,):
        t.copy_(mine)
    averager.set_min_group_size(2)
    gathered = averager.step(timeout=40, allow_retries=False)
    with averager.get_tensors() as (t,):
        print(json.dumps({"first": first, "group": len(gathered), "values": sorted(set(t.tolist()))}), flush=True)
    time.sleep(3)  # a reducer that leaves at once can cut the other's last results
    averager.shutdown()
    dht.shutdown()


def test_an_allreduce_broken_by_a_dying_reducer_raises_and_a_refilled_retry_averages_the_rest(tmp_path: Path) -> None:
    """A reducer that dies mid-way fails the all-reduce for every member (hivemind would fill its parts
    with the member's own values and report success), and nothing of the broken attempt reaches the
    tensors once it raised: the retry as two gives exactly the two members' mean (1 and 2: 1.5)."""
    results = _run_trio("_broken_allreduce_peer", str(tmp_path / "boot"), waited=2)
    # Each member's first attempt raised (hivemind's own runner would have reported "averaged"). Which
    # error says so depends on what it saw first: parts that never came back ("a reducer failed mid-way"),
    # or its stream to the dead reducer cut (once in a `make test`: "Unable to run All-Reduce: " with an
    # empty cause).
    for r in results:
        assert "Unable to run All-Reduce" in r["first"] or "failed mid-way" in r["first"], r
        assert r["group"] == 2 and r["values"] == [1.5], r


# Each pairing covers a rule and a wire format: the mean's result and the robust rule's, fp16's bytes and int8's.
@pytest.mark.parametrize(("rule", "wire"), [("centered_clip", "fp16"), ("mean", "int8")])
def test_robust_allreduce_gives_every_member_identical_results(rule: str, wire: str, tmp_path: Path) -> None:
    """Three real averagers over hivemind: every member ends with the same bytes, the robust rule keeps
    the Byzantine third peer's -10x contribution out (the mean does not), and the wire format sets the
    bytes sent.

    On a loaded 2-core machine a libp2p stream is now and then cut mid-way (a member logs "received
    12 % results"); that member raises rather than apply a partial result, and in training it would take
    the round from the others (tests/test_train.py). Here the trio then runs once more."""
    for attempt in range(2):
        results = _run_trio("_allreduce_peer", rule, wire, str(tmp_path / f"boot-{attempt}"))
        if all(r["group"] == 3 for r in results):
            break
    assert all(r["group"] == 3 for r in results)
    assert len({r["digest"] for r in results}) == 1
    # Each member sends the parts it does not reduce and its aggregate to the other two: 3 x 300k + 300k
    # values in all, however the parts are split.
    assert sum(r["sent"] for r in results) / 1.2e6 == pytest.approx({"fp16": 2, "int8": 1}[wire], rel=0.05)
    if rule == "mean":
        assert results[0]["mean"] == pytest.approx((1 + 1 - 10) / 3, abs=0.01)
    else:
        assert results[0]["mean"] == pytest.approx(1.0, abs=0.02)


def _download(replica: Replica, meta: Mapping[str, object], tensors: list[torch.Tensor]) -> bool:
    """What a download's stream does with a state (state_download.py), without the network."""
    download = replica.download(meta, [torch.empty_like(g) for g in replica.outer.params])
    for i, tensor in enumerate(tensors):
        download.put(i, tensor.clone())
    return download.finish(len(tensors))


@pytest.mark.parametrize("mode", ["diloco", "ddp"])
def test_shared_state_carries_what_peers_must_agree_on(tmp_path: Path, mode: str) -> None:
    """A peer that downloads another's state then takes the same step with the same batch lands on the
    same weights: in DDP mode that needs the AdamW moments too, not just the weights."""
    from swarmlm.train.data import default_corpus_files, prepare
    from swarmlm.train.trainer import Trainer

    prepare(default_corpus_files()[:1], tmp_path / "data", train_tokenizer=300, block_size=32)
    cfg = TrainConfig(data=tmp_path / "data", run_dir=tmp_path / "a", mode=mode, batch_size=2, inner_steps=3)
    ahead, behind = Trainer(cfg), Trainer(TrainConfig(**{**vars(cfg), "run_dir": tmp_path / "b"}))
    batch = ahead.shards.blocks(range(2))
    for i in range(3):
        ahead._inner_step(batch, i)
        ahead._clip_and_step()
    with torch.no_grad():
        for g, p in zip(ahead.global_params, ahead.model.params, strict=True):
            g.copy_(p)
    if mode == "diloco":  # give the outer optimizer a momentum to carry
        for g in ahead.global_params:
            g.grad = torch.ones_like(g)
        ahead.outer.sgd.step()
    ahead.round = 1
    ahead.publish()
    meta, tensors = ahead.replica.shared()
    assert _download(behind.replica, meta, tensors)
    assert behind.replica.digest() == ahead.replica.digest()
    if mode == "diloco":  # the outer momentum travels; inner AdamW state is each peer's own
        for a, b in zip(ahead.global_params, behind.global_params, strict=True):
            assert torch.equal(
                ahead.outer.sgd.state[a]["momentum_buffer"], behind.outer.sgd.state[b]["momentum_buffer"]
            )
        return
    for t in (ahead, behind):  # the same next step on both
        t._inner_step(batch, 0)
        t._clip_and_step()
    for a, b in zip(ahead.model.params, behind.model.params, strict=True):
        assert torch.equal(a, b)


def test_without_outer_momentum_the_state_offered_is_the_weights_alone(tmp_path: Path) -> None:
    """`--outer-momentum 0` (the 1.7B recipe): a newcomer downloads the weights, not also a vector of zeros
    as large; a peer with momentum keeps its own when the state it downloads has none."""
    from swarmlm.train.data import default_corpus_files, prepare
    from swarmlm.train.trainer import Trainer

    prepare(default_corpus_files()[:1], tmp_path / "data", train_tokenizer=300, block_size=32)
    cfg = TrainConfig(data=tmp_path / "data", run_dir=tmp_path / "a", outer_momentum=0.0, batch_size=2)
    ahead = Trainer(cfg)
    behind = Trainer(TrainConfig(**{**vars(cfg), "run_dir": tmp_path / "b", "seed": 1}))
    with_momentum = Trainer(TrainConfig(**{**vars(cfg), "run_dir": tmp_path / "c", "seed": 2, "outer_momentum": 0.9}))
    meta, tensors = ahead.replica.shared()
    assert len(tensors) == len(ahead.global_params)
    assert behind.replica.digest() != ahead.replica.digest()
    assert _download(behind.replica, meta, tensors) and behind.replica.digest() == ahead.replica.digest()
    for m in with_momentum.outer.momentum():
        m.fill_(1.0)
    kept = [m.clone() for m in with_momentum.outer.momentum()]
    assert _download(with_momentum.replica, meta, tensors)
    assert with_momentum.replica.digest() == ahead.replica.digest()
    assert all(torch.equal(a, b) for a, b in zip(kept, with_momentum.outer.momentum(), strict=True))


def test_a_download_that_changed_while_streamed_is_not_taken(tmp_path: Path) -> None:
    """DiLoCo's shared state is handed out live (no copy): a step between the offer and the end of the
    stream shows in the weights' digest, and the downloader keeps what it had."""
    from swarmlm.train.data import default_corpus_files, prepare
    from swarmlm.train.trainer import Trainer

    prepare(default_corpus_files()[:1], tmp_path / "data", train_tokenizer=300, block_size=32)
    cfg = TrainConfig(data=tmp_path / "data", run_dir=tmp_path / "a", batch_size=2, inner_steps=3)
    ahead, behind = Trainer(cfg), Trainer(TrainConfig(**{**vars(cfg), "run_dir": tmp_path / "b", "seed": 1}))
    assert all(t.is_shared() for t in ahead.outer.momentum() + ahead.global_params)
    meta, tensors = ahead.replica.shared()
    ahead.outer.step([torch.ones_like(g) for g in ahead.global_params])  # after the offer, as if mid-stream
    before = behind.replica.digest()
    assert not _download(behind.replica, meta, tensors)
    assert behind.replica.digest() == before and behind.round == 0


def test_a_download_that_does_not_fit_is_refused_whole(tmp_path: Path) -> None:
    """A state that does not say its round or optimizer tensors, holds a tensor of another shape, more
    tensors than it announced or fewer: refused with what is wrong, and the downloader's weights and round
    stay as they were (the stream's caller logs it and asks the next peer)."""
    from swarmlm.train.data import default_corpus_files, prepare
    from swarmlm.train.trainer import Trainer

    prepare(default_corpus_files()[:1], tmp_path / "data", train_tokenizer=300, block_size=32)
    cfg = TrainConfig(data=tmp_path / "data", run_dir=tmp_path / "a", batch_size=2)
    ahead, behind = Trainer(cfg), Trainer(TrainConfig(**{**vars(cfg), "run_dir": tmp_path / "b", "seed": 1}))
    ahead.round = 1
    meta, tensors = ahead.replica.shared()
    before = behind.replica.digest()
    with pytest.raises(ValueError, match="does not say its round"):
        _download(behind.replica, {k: v for k, v in meta.items() if k != "common"}, tensors)
    with pytest.raises(ValueError, match="where ours is"):
        _download(behind.replica, meta, [*tensors[:-1], torch.zeros(3)])
    with pytest.raises(ValueError, match="more than the"):
        _download(behind.replica, meta, [*tensors, tensors[-1]])
    assert not _download(behind.replica, meta, tensors[:-1])
    assert behind.replica.digest() == before and behind.round == 0
    assert _download(behind.replica, meta, tensors) and behind.round == 1


def test_a_bf16_adafactor_peer_holds_half_the_weights_and_next_to_no_optimizer_state(tmp_path: Path) -> None:
    """`--dtype bf16 --optimizer adafactor`, the recipe for peers short of memory: weights and the global
    copy in bf16, Adafactor's factored moments (a row and a column per matrix), the loss falling, and a
    checkpoint that restores the same bf16 state."""
    from swarmlm.train.data import default_corpus_files, prepare
    from swarmlm.train.trainer import Trainer

    prepare(default_corpus_files()[:1], tmp_path / "data", train_tokenizer=300, block_size=32)
    cfg = TrainConfig(
        data=tmp_path / "data", run_dir=tmp_path / "a", dtype="bf16", optimizer="adafactor", inner_lr=0.3, batch_size=4
    )
    lean = Trainer(cfg)
    assert {p.dtype for p in lean.model.params + lean.global_params} == {torch.bfloat16}
    batches = lean.shards.batches(4, seed=0)
    losses = []
    for i in range(12):
        losses.append(lean._inner_step(next(batches)[1], i))
        lean._clip_and_step()
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.3, losses
    weights = sum(p.numel() for p in lean.model.params)
    moments = sum(t.numel() for s in lean.inner.optimizer.state.values() for t in s.values() if t.ndim)
    assert 0 < moments < weights / 20
    lean.round = 1
    lean.save(losses[-1])
    again = Trainer(cfg)
    assert again.restore() and again.replica.digest() == lean.replica.digest()
    assert all(torch.equal(a, b) for a, b in zip(again.model.params, lean.model.params, strict=True))
