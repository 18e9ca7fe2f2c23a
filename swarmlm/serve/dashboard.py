"""`GET /dashboard`: a live page of the swarm as one gateway sees it.

The page is static HTML with a little script that polls `GET /dashboard/state` (JSON) every second and
redraws: a coverage bar over the model's layers, one row per peer (its span drawn on the same axis, its
device, memory budget and measured throughput), the gateway's own load, and the validation-loss curve of
each training run in the same DHT. The state comes from a callable the gateway supplies (serve/ does not
know the swarm); no JavaScript framework, so it works on an air-gapped peer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import HTMLResponse, JSONResponse

from swarmlm.serve.access import require_key_if_protected

StateFn = Callable[[], Awaitable[dict[str, Any]]]

POLL_MS = 1000

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>swarmlm dashboard</title>
<style>
 body { font: 14px system-ui, sans-serif; margin: 24px; color: #1d2330; background: #f7f8fa; }
 h1 { font-size: 20px; margin: 0 0 4px; } .sub { color: #667; margin-bottom: 18px; }
 .cards { display: flex; gap: 12px; flex-wrap: wrap; margin-bottom: 18px; }
 .card { background: #fff; border: 1px solid #dde; border-radius: 6px; padding: 10px 14px; min-width: 120px; }
 .card b { display: block; font-size: 20px; }
 .bar { display: grid; gap: 1px; margin: 4px 0 14px; }
 .cell { height: 26px; font-size: 11px; display: flex; align-items: center; justify-content: center; color: #fff; }
 .c0 { background: #d9363e; } .c1 { background: #e8a33d; } .c2 { background: #3a9b5c; }
 table { border-collapse: collapse; width: 100%; background: #fff; }
 th, td { border-bottom: 1px solid #e5e7ee; padding: 6px 8px; text-align: left; white-space: nowrap; }
 td.span { width: 40%; } .track { position: relative; height: 14px; background: #eef0f4; }
 .fill { position: absolute; top: 0; bottom: 0; background: #4a74d9; border-radius: 3px; }
 .moving .fill { background: #a0a8b8; } .stale { color: #d9363e; }
 .run { background: #fff; border: 1px solid #dde; border-radius: 6px; padding: 10px 14px; margin-top: 18px; }
 .run svg { width: 100%; height: 160px; } .run polyline { fill: none; stroke: #4a74d9; stroke-width: 2; }
</style></head>
<body>
<h1>swarmlm <span id="model"></span></h1>
<div class="sub">gateway <span id="gateway-health"></span> · updated <span id="updated">never</span></div>
<div class="cards">
 <div class="card">peers<b id="num-peers">-</b></div>
 <div class="card">layers covered<b id="covered">-</b></div>
 <div class="card">requests running<b id="running">-</b></div>
 <div class="card">requests waiting<b id="waiting">-</b></div>
 <div class="card">tokens/s<b id="tps">-</b></div>
 <div class="card">failovers<b id="failovers">-</b></div>
</div>
<div>peers per layer</div>
<div class="bar" id="coverage"></div>
<table><thead><tr><th>peer</th><th>layers</th><th>span</th><th>state</th><th>device</th><th>memory</th>
<th>tok/s</th><th>sessions</th>
<th>queue</th><th>our requests</th><th>free KV tokens</th><th>last seen</th><th>api</th></tr></thead>
<tbody id="peers"></tbody></table>
<div id="training"></div>
<script>
const $ = (id) => document.getElementById(id);
function cell(text) { const td = document.createElement("td"); td.textContent = text; return td; }
function size(bytes) {  // decimal units, as `swarmlm status` prints them
  if (!bytes) return "-";
  const units = [["TB", 1e12], ["GB", 1e9], ["MB", 1e6], ["KB", 1e3]];
  const [unit, scale] = units.find(([, s]) => bytes >= s) || ["B", 1];
  return scale === 1 ? bytes + " B" : (bytes / scale).toFixed(1) + " " + unit;
}
function draw(s) {
  $("model").textContent = s.model;
  $("gateway-health").textContent = s.gateway.health;
  $("updated").textContent = new Date().toLocaleTimeString();
  $("num-peers").textContent = s.peers.length;
  $("covered").textContent = s.coverage.filter((c) => c > 0).length + " / " + s.num_layers;
  $("running").textContent = s.gateway.running;
  $("waiting").textContent = s.gateway.waiting;
  $("tps").textContent = s.gateway.tokens_per_second.toFixed(1);
  $("failovers").textContent = s.gateway.failovers;
  const bar = $("coverage");
  bar.style.gridTemplateColumns = "repeat(" + s.num_layers + ", 1fr)";
  bar.replaceChildren(...s.coverage.map((c, i) => {
    const d = document.createElement("div");
    d.className = "cell c" + Math.min(c, 2);
    d.title = "layer " + i + ": " + c + " peer(s)";
    d.textContent = c;
    return d;
  }));
  $("peers").replaceChildren(...s.peers.map((p) => {
    const tr = document.createElement("tr");
    tr.className = "peer " + p.state;
    tr.dataset.peerId = p.peer_id;
    const track = document.createElement("div"); track.className = "track";
    const fill = document.createElement("div"); fill.className = "fill";
    fill.style.left = (100 * p.start / s.num_layers) + "%";
    fill.style.width = (100 * (p.end - p.start) / s.num_layers) + "%";
    track.append(fill);
    const span = document.createElement("td"); span.className = "span"; span.append(track);
    const seen = cell(p.last_seen.toFixed(0) + " s ago");
    if (p.last_seen > s.ttl) seen.className = "stale";
    tr.append(cell(p.peer_id.slice(0, 16) + "…"), cell(p.end > p.start ? p.start + ":" + p.end : "none"), span,
              cell(p.state), cell(p.device || "-"), cell(size(p.memory_budget)), cell(p.throughput.toFixed(1)),
              cell(p.sessions), cell(p.queue), cell(p.gateway_sessions), cell(p.free_kv_tokens), seen,
              cell(p.api || "-"));
    return tr;
  }));
}
function curve(points) {  // validation loss per round as an SVG polyline, scaled to the box
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 400 100"); svg.setAttribute("preserveAspectRatio", "none");
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.map((p) =>
    (400 * (p[0] - x0) / (x1 - x0)).toFixed(1) + "," + (95 - 90 * (p[1] - y0) / (y1 - y0)).toFixed(1)).join(" "));
  svg.append(line);
  return svg;
}
function drawTraining(runs) {
  $("training").replaceChildren(...runs.map((r) => {
    const div = document.createElement("div"); div.className = "run"; div.dataset.runId = r.run_id;
    const last = r.curve.length ? r.curve[r.curve.length - 1][1].toFixed(3) : "-";
    const title = document.createElement("div");
    title.textContent = "training run " + r.run_id + " · round " + r.round + " · group " + r.group +
                        " · validation loss " + last;
    div.append(title, curve(r.curve));
    return div;
  }));
}
async function poll() {
  try {
    const r = await fetch("/dashboard/state");
    if (!r.ok) { $("gateway-health").textContent = "HTTP " + r.status; }
    else { const s = await r.json(); draw(s); drawTraining(s.training || []); }
  } catch (e) { $("gateway-health").textContent = "unreachable"; }
  setTimeout(poll, POLL_MS_VALUE);
}
poll();
</script></body></html>
""".replace("POLL_MS_VALUE", str(POLL_MS))


def add_dashboard(app: FastAPI, state: StateFn) -> None:
    guarded = [Depends(require_key_if_protected)]  # --protect-metrics covers the dashboard too

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False, dependencies=guarded)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(_PAGE)

    @app.get("/dashboard/state", include_in_schema=False, dependencies=guarded)
    async def dashboard_state() -> JSONResponse:
        return JSONResponse(await state())
