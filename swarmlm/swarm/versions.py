"""Model versions in the ledger: which weights a span of a model must hold.

A `model_version` entry carries a model's per-layer weights digests (`checkpoint_digests`). The first
serving peer that finds none for its model in its ledger signs one from its checkpoint; a peer whose own
span differs from the version says so in its log. A client routes only through peers whose announced
span digest matches the version (`expected_digest`), so a peer serving other weights under the model's
name is never used. Which version counts: the one signed by the most distinct trusted authors (any author
unless the client names whom it trusts), so a single newcomer cannot replace it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable

from swarmlm.ledger.chain import Entry
from swarmlm.model.loading import span_digest

KIND = "model_version"


def version_body(model_id: str, parts: dict[str, str]) -> dict[str, object]:
    return {"model": model_id, "layers": {k: v for k, v in parts.items() if k.startswith("layer.")}}


def model_version(entries: Iterable[Entry], model_id: str, trusted: Collection[str] = ()) -> dict[str, str] | None:
    """The layer digests of `model_id` that the ledger's entries agree on, or None if it has no version."""
    authors: dict[tuple[tuple[str, str], ...], set[str]] = defaultdict(set)
    for e in entries:
        if e.kind != KIND or e.body.get("model") != model_id or (trusted and e.author not in trusted):
            continue
        layers = e.body.get("layers")
        if isinstance(layers, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in layers.items()):
            authors[tuple(sorted(layers.items()))].add(e.author)
    if not authors:
        return None
    return dict(max(authors, key=lambda version: len(authors[version])))


def expected_digest(version: dict[str, str], start: int, end: int) -> str | None:
    """What a peer serving layers [start, end) of this version must announce (None: the version does not
    cover those layers)."""
    keys = [f"layer.{i}" for i in range(start, end)]
    if not keys or any(k not in version for k in keys):
        return None
    return span_digest({k: version[k] for k in keys})
