"""`make demo`: a local swarm serving the embedded model, used through the official openai client.

Three peer processes split SmolLM2's 30 layers (0:15 once, 15:30 twice, so one range survives a peer's
loss), and a fourth serves no layers but runs the gateway: the OpenAI API and the dashboard.
"""

from __future__ import annotations

import signal
import time

from rich.console import Console
from rich.table import Table

from swarmlm.launch.peers import PeerProcess, start_swarm, stop_all

console = Console(soft_wrap=True)  # long URLs stay on one line, ready to copy

DEMO_SPANS = ["0:15", "15:30", "15:30"]


def run_demo(port: int, prompt: str, once: bool) -> int:
    from openai import OpenAI

    base = f"http://127.0.0.1:{port}"
    for sig in (signal.SIGTERM, signal.SIGHUP):  # like Ctrl-C: stop the swarm, do not orphan it
        signal.signal(sig, _interrupt)
    console.print(f"[bold]swarmlm demo[/]: starting {len(DEMO_SPANS)} peers (layers {', '.join(DEMO_SPANS)}) …")
    procs: list[PeerProcess] = []
    try:
        procs = start_swarm(DEMO_SPANS)
        console.print("starting the gateway (serves no layers; OpenAI API and dashboard) …")
        gateway = PeerProcess("--layers", "none", "--api", f"127.0.0.1:{port}", initial=procs[0].maddr, threads=None)
        procs.append(gateway)  # before waiting: a Ctrl-C meanwhile must stop it too
        gateway.wait_ready()
        console.print(_swarm_table(procs))
        client = OpenAI(base_url=f"{base}/v1", api_key="demo")
        model = client.models.list().data[0].id
        console.print(f"[bold]user:[/] {prompt}\n[bold]{model} (via the swarm):[/] ", end="")
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
        console.print(f"Dashboard:   {base}/dashboard")
        console.print(f"Metrics:     {base}/metrics\nHealth:      {base}/health\nAPI schema:  {base}/docs")
        console.print(f"Join it:     swarmlm peer --initial-peers {procs[0].maddr}")
        console.print(f"Status:      swarmlm status --initial-peers {procs[0].maddr}")
        console.print(f"Peer logs:   {', '.join(str(p.log) for p in procs)}")
        if not once:
            console.print("Serving until Ctrl-C.")
            while all(p.proc.poll() is None for p in procs):
                time.sleep(1)
            console.print("[red]a process of the swarm exited[/]")
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        stop_all(procs)  # each withdraws its record and exits
        console.print("stopped.")


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _swarm_table(procs: list[PeerProcess]) -> Table:
    table = Table(title="local swarm")
    for col in ("peer", "layers", "api"):
        table.add_column(col)
    for p in procs:
        start, end = p.span()
        table.add_row(p.peer_id, f"{start}:{end}" if end > start else "none", p.api or "-")
    return table
