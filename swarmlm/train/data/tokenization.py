"""Tokenizers of the data pipeline: a model's, or a byte-level BPE trained on the cleaned corpus; and the
packed token stream they make.

Packing appends the document separator (the tokenizer's `<|endoftext|>` if it has one, else its EOS
token) after each document, and the BOS token before it when the tokenizer adds one to prompts.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np

from swarmlm.core.files import atomic_directory
from swarmlm.model.tokenizer import Tokenizer
from swarmlm.train.data.manifest import MANIFEST, TOKENIZER_DIR, DataError, Manifest, PrepareStats

ENDOFTEXT = "<|endoftext|>"
MAX_TRAINED_VOCAB = 1 << 20
_BATCH_CHARS = 1 << 20  # characters handed to the tokenizer's (parallel) encode_batch at once


@lru_cache(maxsize=4)
def model_tokenizer(model: str | None) -> tuple[str, Tokenizer]:
    """(model id or absolute path, tokenizer). Cached: reading GGUF metadata takes seconds."""
    from swarmlm.model.checkpoint import open_checkpoint
    from swarmlm.model.loading import DEFAULT_MODEL_ID, resolve_model
    from swarmlm.model.tokenizer import load_tokenizer

    _, path = resolve_model(model)
    name = DEFAULT_MODEL_ID if model in (None, "", DEFAULT_MODEL_ID) else str(path.resolve())
    return name, load_tokenizer(open_checkpoint(path))


def _trained_tokenizer(path: Path) -> Tokenizer:
    """Loaded as the class `train_bpe` saved it with: `AutoTokenizer` would find the same class, but
    building its family mapping costs every training peer 1.5 s at start (7 ms this way)."""
    from transformers import PreTrainedTokenizerFast

    try:
        hf = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: the trained tokenizer cannot be loaded ({e})") from e
    return Tokenizer(hf, [hf.eos_token_id], add_bos=False)


def train_bpe(texts: Iterator[str], vocab_size: int, out_dir: Path) -> Tokenizer:
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
    with atomic_directory(out_dir / TOKENIZER_DIR) as tmp:
        hf.save_pretrained(str(tmp))
    return _trained_tokenizer(out_dir / TOKENIZER_DIR)


def load_data_tokenizer(data_dir: Path | str) -> Tokenizer:
    """The tokenizer a prepared data directory was tokenized with (trained into it, or the model's)."""
    data_dir = Path(data_dir)
    manifest = Manifest.load(data_dir)
    desc = manifest.tokenizer
    if desc.get("kind") == "trained":
        tok = _trained_tokenizer(data_dir / desc.get("path", TOKENIZER_DIR))
    elif desc.get("kind") == "model":
        tok = model_tokenizer(desc.get("model"))[1]
    else:
        raise DataError(f"{data_dir / MANIFEST}: unknown tokenizer {desc!r}")
    if len(tok.hf) != manifest.vocab_size:
        raise DataError(
            f"{data_dir}: the tokenizer has {len(tok.hf)} tokens but the shards were made with {manifest.vocab_size}"
        )
    return tok


def separator(tok: Tokenizer) -> int | None:
    """The document separator: `<|endoftext|>` where the vocabulary has it as a special token (an
    instruct model's EOS, like SmolLM2's <|im_end|>, ends a chat turn, not a document), else EOS."""
    hf = tok.hf
    if ENDOFTEXT in hf.all_special_tokens:
        return int(hf.convert_tokens_to_ids(ENDOFTEXT))
    return None if hf.eos_token_id is None else int(hf.eos_token_id)


def token_batches(
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
