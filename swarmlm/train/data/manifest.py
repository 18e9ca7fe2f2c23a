"""The record of a prepared data directory: OUT/manifest.json, its shards and what went into them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

FORMAT = "swarmlm-tokens-1"
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")


class DataError(ValueError):
    """Bad training data or options: a missing source, an unreadable file, a missing or corrupt shard."""


@dataclass
class PrepareStats:
    """What `prepare` read, dropped and wrote. lines_read = lines_kept + empty_dropped +
    duplicates_removed + boilerplate_dropped (bad JSONL lines are counted apart)."""

    files: int = 0  # files taken (skipped ones are counted in files_skipped)
    documents: int = 0  # documents with at least one kept line
    lines_read: int = 0
    lines_kept: int = 0
    empty_dropped: int = 0  # empty or near-empty lines
    duplicates_removed: int = 0
    boilerplate_dropped: int = 0  # Project Gutenberg header and footer lines
    bad_jsonl_lines: int = 0
    characters: int = 0  # of the cleaned text that was tokenized (newlines between lines included)
    tokens: int = 0  # the packed stream, document separators included
    tail_tokens_dropped: int = 0  # the last partial block
    train_blocks: int = 0
    val_blocks: int = 0
    files_skipped: int = 0  # binary, empty, unreadable or undecodable files


@dataclass(frozen=True)
class Shard:
    file: str
    blocks: int
    sha256: str


@dataclass(frozen=True)
class SourceFile:
    """A file whose text went into the shards."""

    path: str
    bytes: int
    encoding: str  # the Python codec it was decoded with
    documents: int
    lines_kept: int


@dataclass(frozen=True)
class SkippedFile:
    """A file left out, and why; `line` is counted within that file (1-based) where one line is to blame."""

    path: str
    reason: str
    line: int | None = None

    def describe(self) -> str:
        return f"{self.path}: {self.reason}" + ("" if self.line is None else f" (line {self.line})")


@dataclass
class Manifest:
    """The contents of OUT/manifest.json. No timestamps or output paths: the same inputs and options give
    a byte-identical manifest."""

    block_size: int
    dtype: str  # "uint16" or "uint32", little-endian
    vocab_size: int
    tokenizer: dict[str, Any]  # {"kind": "trained", "path": "tokenizer"} or {"kind": "model", "model": ...}
    eos_id: int | None  # the document separator
    bos_id: int | None  # prepended to each document, or None
    seed: int
    val_fraction: float
    shard_blocks: int
    splits: dict[str, list[Shard]]
    stats: PrepareStats
    sources: list[str]
    format: str = FORMAT
    files: list[SourceFile] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    @property
    def num_shards(self) -> int:
        return sum(len(s) for s in self.splits.values())

    def to_json(self) -> str:
        d: dict[str, Any] = {"format": self.format}
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "format"})
        d["splits"] = {k: [asdict(s) for s in v] for k, v in self.splits.items()}
        d["stats"] = asdict(self.stats)
        d["files"] = [asdict(f) for f in self.files]
        d["skipped"] = [asdict(s) for s in self.skipped]
        return json.dumps(d, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST) -> Manifest:
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise TypeError("not a JSON object")
            if d.get("format") != FORMAT:
                raise DataError(f"{where}: unsupported format {d.get('format')!r} (expected {FORMAT!r})")
            d["splits"] = {k: [Shard(**s) for s in v] for k, v in d["splits"].items()}
            d["stats"] = PrepareStats(**d["stats"])
            d["files"] = [SourceFile(**f) for f in d.get("files", [])]
            d["skipped"] = [SkippedFile(**s) for s in d.get("skipped", [])]
            return cls(**d)
        except DataError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # JSONDecodeError is a ValueError
            raise DataError(f"{where}: not a valid data manifest ({type(e).__name__}: {e})") from e

    @classmethod
    def load(cls, data_dir: Path | str) -> Manifest:
        path = Path(data_dir) / MANIFEST
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as e:
            raise DataError(
                f"{path}: missing (not a prepared data directory, or `swarmlm data prepare` did not finish)"
            ) from e
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: unreadable ({e})") from e
        return cls.from_json(text, str(path))
