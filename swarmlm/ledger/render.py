"""How entries read in a terminal (`swarmlm ledger show`)."""

from __future__ import annotations

import datetime as dt
import json

from rich.table import Table

from swarmlm.ledger.chain import Entry, LedgerError


def entries_table(items: list[Entry | LedgerError], kind: str | None = None, last: int | None = None) -> Table:
    rows = [
        (i, e) for i, e in enumerate(items, start=1) if kind is None or isinstance(e, LedgerError) or e.kind == kind
    ]
    table = Table(title=f"{len(items)} entries" + (f", {len(rows)} of kind {kind}" if kind else ""))
    for col in ("#", "time (UTC)", "author", "seq", "kind", "body", "hash"):
        table.add_column(col, overflow="fold")
    for position, e in rows[-last:] if last else rows:
        if isinstance(e, LedgerError):
            table.add_row(str(position), "", "", "", "[red]unreadable[/]", str(e), "")
            continue
        when = dt.datetime.fromtimestamp(e.time, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        body = json.dumps(e.body, separators=(",", ":"))
        table.add_row(str(position), when, e.author[-8:], str(e.seq), e.kind, body[:120], e.hash[:12])
    return table
