"""`make demo`: one peer serving the embedded model, used through the official openai client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console

console = Console()


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} while starting")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f} s")


def run_demo(port: int, prompt: str, once: bool) -> int:
    from openai import OpenAI

    base = f"http://127.0.0.1:{port}"
    console.print(f"[bold]swarmlm demo[/]: starting a peer on {base} with the embedded SmolLM2-135M-Instruct…")
    log = Path(tempfile.gettempdir()) / f"swarmlm-demo-{port}.log"
    # Its own session: Ctrl-C reaches only the demo, which then stops the server cleanly (SIGTERM).
    proc = subprocess.Popen(
        [sys.executable, "-m", "swarmlm.cli", "serve", "--port", str(port)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_healthy(f"{base}/health", proc)
        client = OpenAI(base_url=f"{base}/v1", api_key="demo")
        model = client.models.list().data[0].id
        console.print(f"[bold]user:[/] {prompt}\n[bold]{model}:[/] ", end="")
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=96, temperature=0, stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                console.print(chunk.choices[0].delta.content, end="", markup=False, highlight=False)
        console.print()
        console.print(
            f"\nOpenAI API:  {base}/v1   (e.g. curl {base}/v1/chat/completions -H 'content-type: "
            f'application/json\' -d \'{{"model": "{model}", "messages": [{{"role": "user", '
            f'"content": "Hi"}}]}}\')'
        )
        console.print(f"Metrics:     {base}/metrics\nHealth:      {base}/health\nAPI schema:  {base}/docs")
        console.print(f"Server log:  {log}")
        if not once:
            console.print("Serving until Ctrl-C.")
            proc.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        console.print("stopped.")
