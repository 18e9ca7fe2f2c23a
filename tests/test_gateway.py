"""A gateway (`swarmlm peer --layers none --api`) in front of real peer processes on loopback: the OpenAI
API backed by the swarm, many concurrent clients, the dashboard in headless Chromium, and a peer killed
mid-stream."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import pytest
from openai import OpenAI

from swarmlm.engine.engine import Engine, EngineConfig
from swarmlm.engine.sampling import SamplingParams
from swarmlm.engine.scheduler import make_scheduler
from swarmlm.launch.peers import PeerProcess, free_port, start_swarm, stop_all
from swarmlm.model.loading import LoadedModel, resolve_device
from swarmlm.model.memory import device_label
from tests.prompt_scoring import assert_scores_the_prompt
from tests.test_structured_output import ASK, SCHEMAS, json_schema_format

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["The capital of France is", "Once upon a time, in a quiet village,", "Die Hauptstadt von Deutschland ist"]


class Swarm:
    def __init__(self) -> None:
        self.peers: list[PeerProcess] = []
        self.gateway: PeerProcess | None = None

    @property
    def base(self) -> str:
        assert self.gateway is not None and self.gateway.api is not None
        return f"http://{self.gateway.api}"

    def stop(self) -> None:
        stop_all([*self.peers, *([self.gateway] if self.gateway else [])])


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    """Layers 0:15 once and 15:30 twice (a spare for failover), and a gateway serving no layers. Its
    sequences flow through the chain as 3 micro-batches (by default one here: every peer is on this
    machine), so every test below also checks pipelined groups against the local engine."""
    s = Swarm()
    try:
        s.peers = start_swarm(["0:15", "15:30", "15:30"])
        api = f"127.0.0.1:{free_port()}"
        args = ("--layers", "none", "--api", api, "--max-batch-seqs", "16", "--micro-batches", "3")
        s.gateway = PeerProcess(*args, initial=s.peers[0].maddr, threads=None).wait_ready()
        yield s
    finally:
        s.stop()


def expected_text(model: LoadedModel, prompt_ids: list[int], max_tokens: int) -> str:
    """The single-process engine's greedy continuation."""
    engine = Engine(model, make_scheduler("fcfs"), EngineConfig(kv_budget_bytes=256 << 20))
    (seq,) = engine.add(prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0))
    while engine.has_work:
        engine.step()
    return seq.text


def test_openai_client_streams_the_local_engines_answer(swarm: Swarm, model: LoadedModel) -> None:
    client = OpenAI(base_url=f"{swarm.base}/v1", api_key="test")
    assert [m.id for m in client.models.list().data] == [MODEL]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt_ids = model.tokenizer.encode(model.tokenizer.chat_prompt(messages))
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=24,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == expected_text(model, prompt_ids, 24)
    assert "Paris" in text


def test_echo_scores_the_prompt_through_the_swarm(swarm: Swarm, model: LoadedModel) -> None:
    """The gateway runs the head over every prompt position the peers return: the whole model's logprobs
    in this process, to bf16's precision (the gateway's default wire; `--wire-dtype fp32` for evaluation:
    tests/test_lm_eval.py)."""
    assert_scores_the_prompt(swarm.base, MODEL, model, tolerance=0.05)


def test_structured_output_through_the_swarm(swarm: Swarm) -> None:
    """The gateway's engine constrains what the peers' logits sample to, as one server's does."""
    client = OpenAI(base_url=f"{swarm.base}/v1", api_key="test", max_retries=0, timeout=120)
    schema = SCHEMAS["bounded numbers"]
    out = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        response_format=json_schema_format("numbers", schema),
        max_tokens=200,
        n=2,
        seed=4,  # unseeded, a sampled number's digits ran past 100 tokens now and then
    )
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content or ""), schema)


def test_bad_requests_get_clear_errors(swarm: Swarm) -> None:
    r = httpx.post(f"{swarm.base}/v1/completions", json={"model": "nope", "prompt": "hi"}, timeout=30)
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
    r = httpx.post(f"{swarm.base}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 10**6})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    r = httpx.post(f"{swarm.base}/v1/embeddings", json={"model": MODEL, "input": "hi"}, timeout=30)
    assert r.status_code == 400 and "whole model in one process" in r.json()["error"]["message"]


def test_many_concurrent_clients_all_complete(swarm: Swarm, model: LoadedModel) -> None:
    expected = {p: expected_text(model, model.tokenizer.encode(p), 12) for p in PROMPTS}

    def one(i: int) -> tuple[str, str]:
        prompt = PROMPTS[i % len(PROMPTS)]
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": i % 2 == 0}
        with httpx.Client(timeout=300) as http:
            if not body["stream"]:
                r = http.post(f"{swarm.base}/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return prompt, r.json()["choices"][0]["text"]
            text = ""
            with http.stream("POST", f"{swarm.base}/v1/completions", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        assert "error" not in chunk, chunk
                        text += chunk["choices"][0]["text"]
            return prompt, text

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(24)))
    assert len(results) == 24
    for prompt, text in results:  # batched through the swarm, each answer is still the greedy one
        assert text == expected[prompt]


def test_dashboard_in_headless_chromium(swarm: Swarm, tmp_path: Path) -> None:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("Debian chromium and chromium-driver are not installed (make browser)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-sync",
        "--disable-background-networking",
        "--disable-component-update",
        "--window-size=1400,900",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        browser.get(f"{swarm.base}/dashboard")
        everyone = {p.peer_id for p in swarm.peers} | {swarm.gateway.peer_id}  # type: ignore[union-attr]

        def read(selector: str, attribute: str | None = None) -> list[str]:
            """Texts (or an attribute) of the matching elements in one script call: the page re-renders on
            every refresh, so an element found in one call may be gone (stale) by the next."""
            script = (
                "return [...document.querySelectorAll(arguments[0])]"
                ".map(e => String(arguments[1] ? e.getAttribute(arguments[1]) : e.textContent).trim())"
            )
            return browser.execute_script(script, selector, attribute)

        WebDriverWait(browser, 30).until(lambda _: set(read("tr.peer", "data-peer-id")) == everyone)
        assert read("#coverage .cell") == ["1"] * 15 + ["2"] * 15  # peers per layer
        assert read("#covered") == ["30 / 30"]
        assert read("#gateway-health") == ["ok"]
        # Each row's device and memory budget (columns 5 and 6), as the peers announce them.
        assert set(read("tr.peer td:nth-child(5)")) == {device_label(resolve_device("auto"))}
        assert all(re.fullmatch(r"\d+\.\d (MB|GB|TB)", m) for m in read("tr.peer td:nth-child(6)"))
        shot = tmp_path / "dashboard.png"
        browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    finally:
        browser.quit()


def swarmlm_status(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "swarmlm.cli", "status", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})


def test_status_through_the_gateway_matches_the_dht(swarm: Swarm) -> None:
    """`swarmlm status --gateway` (no hivemind, no DHT node of its own) shows what the DHT shows."""
    assert swarm.gateway is not None
    via_gateway, via_dht = (
        swarmlm_status("--gateway", swarm.base),
        swarmlm_status("--initial-peers", swarm.peers[0].maddr),
    )
    assert via_gateway.returncode == via_dht.returncode == 0, via_gateway.stderr + via_dht.stderr
    for out in (via_gateway.stdout, via_dht.stdout):
        assert "4 live peers" in out and "1" * 15 + "2" * 15 in out  # three peers and the gateway; 15:30 twice
        assert all(p.peer_id[:16] in out for p in [*swarm.peers, swarm.gateway])
    refused = swarmlm_status(
        "--gateway", swarm.peers[0].maddr.split("/p2p/")[0].replace("/ip4/", "").replace("/tcp/", ":")
    )
    assert refused.returncode == 2 and "does not speak HTTP" in refused.stderr


def test_kill_9_mid_stream_through_the_gateway(swarm: Swarm, model: LoadedModel) -> None:
    """The gateway's sessions fail over like a RemoteModel's: the streamed text is unchanged."""
    prompt = PROMPTS[1]
    expected = expected_text(model, model.tokenizer.encode(prompt), 32)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 32, "temperature": 0, "stream": True}
    text, chunks, victim = "", 0, None
    with httpx.Client(timeout=300) as http, http.stream("POST", f"{swarm.base}/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            text += chunk["choices"][0]["text"]
            chunks += 1
            if chunks == 5:
                state = http.get(f"{swarm.base}/dashboard/state").json()
                in_use = {p["peer_id"] for p in state["peers"] if p["gateway_sessions"] and p["start"] == 15}
                victim = next(p for p in swarm.peers[1:] if p.peer_id in in_use)
                victim.crash()
        metrics = http.get(f"{swarm.base}/metrics").text
    assert victim is not None
    assert text == expected
    name = "swarmlm:swarm_failover_recovery_seconds_count"
    count = next(line for line in metrics.splitlines() if line.startswith(name))
    assert float(count.split()[-1]) >= 1


def test_a_serving_peer_can_also_be_the_gateway(model: LoadedModel) -> None:
    """`--api` on a peer that serves layers: its gateway runs beside its span engine (in a thread)."""
    api = f"127.0.0.1:{free_port()}"
    peer = PeerProcess("--layers", "0:30", "--api", api)
    try:
        peer.wait_ready()
        body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 12, "temperature": 0}
        r = httpx.post(f"http://{api}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected_text(model, model.tokenizer.encode(PROMPTS[2]), 12)
        state = httpx.get(f"http://{api}/dashboard/state", timeout=30).json()
        assert [(p["start"], p["end"], p["api"]) for p in state["peers"]] == [(0, 30, api)]
    finally:
        peer.stop()
