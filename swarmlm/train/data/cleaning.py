"""Cleaning: what of a document's raw lines is kept, and the kept text in pieces for the tokenizer.

Per line: Unicode NFC; control characters are removed, except whitespace ones (tab, vertical tab, form
feed, ...) which become spaces; runs of whitespace collapse to one space; the line is stripped. A line
with fewer than `MIN_LINE_CHARS` (2) non-space characters is dropped (empty lines, a stray bracket, a
one-digit page number), and so is an exact duplicate of a line of at least `DEDUP_MIN_CHARS` (32)
characters seen earlier in the corpus (found by 8-byte blake2b digests of cleaned lines). Shorter lines
repeat legitimately (a play's speaker tags, "Exit.", a list's "- yes"): removing them would strip the
text's structure, while the duplicates that harm training (boilerplate, copied passages) are longer.
In a text file, a Project Gutenberg header (up to a `*** START OF` line within the first
`GUTENBERG_LOOKAHEAD` lines) and footer (from a `*** END OF` line) are dropped.

The kept lines of a document are joined with "\\n".
"""

from __future__ import annotations

import hashlib
import itertools
import re
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path

from swarmlm.train.data.manifest import PrepareStats, SourceFile
from swarmlm.train.data.sources import file_documents

MIN_LINE_CHARS = 2  # fewer non-space characters than this: the line is dropped as near-empty
DEDUP_MIN_CHARS = 32  # shorter lines are kept even when repeated (see the module docstring)
GUTENBERG_LOOKAHEAD = 1000  # lines searched for a `*** START OF` marker (the header is shorter)
_CHUNK_CHARS = 1 << 16  # a long document is handed on in pieces of about this size, cut at line ends
# Control characters that are not whitespace, and BOMs: removed. Whitespace ones (tab, vertical tab, form
# feed, \x1c-\x1f, NEL) are left for str.split(), which turns them into single spaces.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\ufeff]")


class LineCleaner:
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


def gutenberg_body(lines: Iterator[str], stats: PrepareStats) -> Iterator[str]:
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


def clean_chunks(
    files: Sequence[tuple[Path, str]], stats: PrepareStats, taken: list[SourceFile] | None = None
) -> Iterator[tuple[str, bool]]:
    """Cleaned text of the (file, codec) pairs as (piece, ends_document): a document's kept lines joined
    by "\\n", in pieces of about `_CHUNK_CHARS` cut at line ends (the pieces of a document concatenate
    to the whole). Appends each file's record to `taken` once it is read."""
    cleaner = LineCleaner(stats)
    for path, codec in files:
        stats.files += 1
        documents, lines_kept = stats.documents, stats.lines_kept
        for raw, is_text_file in file_documents(path, codec, stats):
            buf: list[str] = []
            size = 0
            for line in gutenberg_body(raw, stats) if is_text_file else raw:
                kept = cleaner.clean(line)
                if kept is None:
                    continue
                if size >= _CHUNK_CHARS:  # flush before adding, so the document's last piece is never empty
                    yield "\n".join(buf) + "\n", False
                    buf, size = [], 0
                buf.append(kept)
                size += len(kept) + 1
            if buf:
                stats.documents += 1
                yield "\n".join(buf), True
        if taken is not None:
            taken.append(
                SourceFile(
                    str(path),
                    path.stat().st_size,
                    codec,
                    stats.documents - documents,
                    stats.lines_kept - lines_kept,
                )
            )
