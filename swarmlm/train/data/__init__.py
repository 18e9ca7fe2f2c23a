"""The training data pipeline, a module per stage: sources.py (which files, decoded how: charsets.py) →
cleaning.py → tokenization.py → shards.py, run by pipeline.py's `prepare` and recorded in manifest.py;
reader.py's `TokenShards` is the training side."""

from swarmlm.train.data.cleaning import DEDUP_MIN_CHARS, GUTENBERG_LOOKAHEAD, MIN_LINE_CHARS
from swarmlm.train.data.manifest import (
    FORMAT,
    MANIFEST,
    SPLITS,
    TOKENIZER_DIR,
    DataError,
    Manifest,
    PrepareStats,
    Shard,
    SkippedFile,
    SourceFile,
)
from swarmlm.train.data.pipeline import PrepareConfig, prepare
from swarmlm.train.data.reader import TokenShards
from swarmlm.train.data.sources import DEFAULT_CORPUS, TEXT_SUFFIXES, default_corpus_files, resolve_sources
from swarmlm.train.data.tokenization import ENDOFTEXT, MAX_TRAINED_VOCAB, load_data_tokenizer

__all__ = [
    "DEDUP_MIN_CHARS",
    "DEFAULT_CORPUS",
    "ENDOFTEXT",
    "FORMAT",
    "GUTENBERG_LOOKAHEAD",
    "MANIFEST",
    "MAX_TRAINED_VOCAB",
    "MIN_LINE_CHARS",
    "SPLITS",
    "TEXT_SUFFIXES",
    "TOKENIZER_DIR",
    "DataError",
    "Manifest",
    "PrepareConfig",
    "PrepareStats",
    "Shard",
    "SkippedFile",
    "SourceFile",
    "TokenShards",
    "default_corpus_files",
    "load_data_tokenizer",
    "prepare",
    "resolve_sources",
]
