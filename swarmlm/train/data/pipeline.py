"""Training data: clean text, tokenize it, pack it into fixed-length blocks in checksummed shards.

`prepare(sources, out)` streams documents (text files, folders, JSONL: sources.py) through a cleaner
(cleaning.py), a tokenizer (the model's, or a byte-level BPE trained on the same cleaned text:
tokenization.py) and a packer (shards.py), and writes

    OUT/train-00000.bin ...   raw little-endian token ids, [blocks, block_size], uint16 or uint32
    OUT/val-00000.bin ...
    OUT/tokenizer/            only with a trained tokenizer: a Hugging Face tokenizer directory
    OUT/manifest.json         written last: format, shapes, tokenizer, per-shard sha256, counts, sources,
                              every file taken (bytes, encoding, documents, lines kept) and every file
                              skipped (reason, line within that file)

`TokenShards.open(OUT, split)` (reader.py) checks the shards against the manifest and serves them.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from swarmlm.core.files import atomic_write, fsync_dir
from swarmlm.train.data.charsets import codec_name
from swarmlm.train.data.cleaning import clean_chunks
from swarmlm.train.data.manifest import MANIFEST, SPLITS, TOKENIZER_DIR, DataError, Manifest, PrepareStats, SourceFile
from swarmlm.train.data.shards import token_dtype, write_shards
from swarmlm.train.data.sources import DEFAULT_CORPUS, resolve_sources, text_files
from swarmlm.train.data.tokenization import (
    ENDOFTEXT,
    MAX_TRAINED_VOCAB,
    model_tokenizer,
    separator,
    token_batches,
    train_bpe,
)
from swarmlm.train.train_config import PrepareConfig


def _check(cfg: PrepareConfig) -> None:
    if cfg.block_size < 1:
        raise DataError(f"block size must be at least 1, not {cfg.block_size}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"validation fraction must be in [0, 1), not {cfg.val_fraction}")
    if cfg.shard_blocks < 1:
        raise DataError(f"blocks per shard must be at least 1, not {cfg.shard_blocks}")
    if cfg.train_tokenizer is not None:
        if cfg.tokenizer is not None:
            raise DataError("give either a model tokenizer or --train-tokenizer, not both")
        if not 258 <= cfg.train_tokenizer <= MAX_TRAINED_VOCAB:
            raise DataError(
                f"--train-tokenizer must be a vocabulary size from 258 (256 bytes, {ENDOFTEXT}, one merge) "
                f"to {MAX_TRAINED_VOCAB}, not {cfg.train_tokenizer}"
            )
    if cfg.encoding is not None:
        try:
            codec_name(cfg.encoding)
        except ValueError as e:
            raise DataError(f"--encoding: {e}") from e


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def prepare(
    sources: Sequence[Path | str], out: Path | str, config: PrepareConfig | None = None, **options: Any
) -> Manifest:
    """Clean, tokenize and pack `sources` (files, folders; none: the embedded Shakespeare plays) into
    `out`, with `config` and/or its fields as keywords (`options`). `tokenizer`: a model path (None: the
    embedded model) whose tokenizer to use, or with `train_tokenizer=VOCAB` a byte-level BPE of at most
    VOCAB tokens trained on the cleaned corpus and saved as OUT/tokenizer. Streams: memory holds one
    document piece, one encode batch, the duplicate digests and (when training) the BPE trainer's word
    counts. Replaces what an earlier run left in OUT."""
    cfg = replace(config or PrepareConfig(), **options)
    _check(cfg)
    out = Path(out)
    files, skipped = text_files(resolve_sources(sources), cfg.encoding, cfg.strict)
    if not files:
        raise DataError(f"no text to prepare: all {len(skipped)} files were skipped, first {skipped[0].describe()}")
    # A bad model path fails here, before anything in OUT is touched.
    model = model_tokenizer(cfg.tokenizer) if cfg.train_tokenizer is None else None
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    # Invalidate the old data first: an interrupted run leaves no manifest, never one naming new shards.
    (out / MANIFEST).unlink(missing_ok=True)
    for stale in [*out.glob(".*.tmp"), *out.glob(f".{TOKENIZER_DIR}.*")]:
        _remove(stale)

    if model is None:
        assert cfg.train_tokenizer is not None
        tok = train_bpe((text for text, _ in clean_chunks(files, PrepareStats())), cfg.train_tokenizer, out)
        tok_desc: dict[str, Any] = {"kind": "trained", "path": TOKENIZER_DIR}
    else:
        tok = model[1]
        tok_desc = {"kind": "model", "model": model[0]}
        _remove(out / TOKENIZER_DIR)
    vocab_size = len(tok.hf)
    sep = separator(tok)
    bos = tok.hf.bos_token_id if tok.add_bos else None

    stats = PrepareStats(files_skipped=len(skipped))
    taken: list[SourceFile] = []
    splits = write_shards(
        token_batches(clean_chunks(files, stats, taken), tok, sep, bos, stats),
        out,
        vocab_size=vocab_size,
        block_size=cfg.block_size,
        shard_blocks=cfg.shard_blocks,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        stats=stats,
    )
    keep = {s.file for shards in splits.values() for s in shards}
    for split in SPLITS:
        for old in out.glob(f"{split}-*.bin"):
            if old.name not in keep:
                old.unlink()
    fsync_dir(out)  # the shards' renames, before the manifest that names them
    manifest = Manifest(
        block_size=cfg.block_size,
        dtype=token_dtype(vocab_size).name,
        vocab_size=vocab_size,
        tokenizer=tok_desc,
        eos_id=sep,
        bos_id=bos,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        shard_blocks=cfg.shard_blocks,
        splits=splits,
        stats=stats,
        sources=[str(s) for s in sources] or [DEFAULT_CORPUS],
        files=taken,
        skipped=skipped,
    )
    atomic_write(out / MANIFEST, manifest.to_json())
    return manifest
