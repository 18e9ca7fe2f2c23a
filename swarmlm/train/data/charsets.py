"""Which text encoding a source file is in, or why it is not text (empty, binary, undecodable).

A file is read whole with one codec: the one named by `--encoding`, else the one its byte-order mark
names, else UTF-8 when its first `SAMPLE_BYTES` decode as UTF-8, else charset-normalizer's guess from
them. Among single-byte Western encodings charset-normalizer often ranks a Baltic or Central European
code page first for French or German text (its "chaos" scores differ by a few hundredths), so a guess
that Windows-1252 decodes almost as cleanly (`WESTERN_MARGIN`) is read as Windows-1252: the commonest
legacy encoding of Western text, and what browsers read a Latin-1 label as. Whatever the codec, the
whole file must then decode with it (a bad byte is reported with its line in that file), and a sample
with more than `MAX_CONTROL_SHARE` control characters is binary data (an image named .txt), not text.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

SAMPLE_BYTES = 1 << 20
WESTERN_MARGIN = 0.05
MAX_CONTROL_SHARE = 0.01
_READ_CHUNK = 1 << 20
_BOMS = (  # UTF-32's little-endian mark starts with UTF-16's: it is tested first
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
# Control characters no text holds (whitespace ones are allowed). Undecodable bytes are not counted:
# they are reported as such, with their line.
_BINARY_CHARS = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]")

# Undecodable bytes become a lone surrogate, which no strict decoder produces: the first one is the bad spot.
_MARK = "\udc00"
_MARK_ERRORS = "swarmlm.mark-undecodable"
codecs.register_error(_MARK_ERRORS, lambda e: (_MARK, e.end))


class NotText(Exception):
    """A file that is not text in a known encoding; `line` (1-based, within the file) where one is to blame."""

    def __init__(self, reason: str, line: int | None = None) -> None:
        super().__init__(reason)
        self.reason, self.line = reason, line


def codec_name(encoding: str) -> str:
    """Python's canonical name of an encoding ("latin1" -> "iso8859-1"); ValueError for an unknown one."""
    try:
        return codecs.lookup(encoding).name
    except LookupError as e:
        raise ValueError(f"unknown text encoding {encoding!r}") from e


def file_encoding(path: Path, encoding: str | None = None) -> str:
    """The codec that decodes all of `path` as text (`encoding` when given). Raises NotText."""
    try:
        with path.open("rb") as f:
            sample = f.read(SAMPLE_BYTES)
    except OSError as e:
        raise NotText(f"cannot read ({e.strerror or e})") from e
    if not sample:
        raise NotText("empty file")
    codec = codec_name(encoding) if encoding else _bom_encoding(sample) or _guess(sample)
    text = codecs.getincrementaldecoder(codec)(errors="replace").decode(sample, final=False)
    binary = len(_BINARY_CHARS.findall(text))
    if binary > MAX_CONTROL_SHARE * max(len(text), 1):
        raise NotText(f"binary data, not text ({binary} control characters in its first {len(text)})")
    _check_decodes(path, codec)
    return codec


def _bom_encoding(sample: bytes) -> str | None:
    return next((codec for bom, codec in _BOMS if sample.startswith(bom)), None)


def _guess(sample: bytes) -> str:
    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)  # a cut last character is fine
        return "utf-8"
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    matches = list(from_bytes(sample))
    if not matches:
        raise NotText("binary data, or text in an encoding charset-normalizer does not recognise (try --encoding)")
    best = matches[0]
    western = next((m for m in matches if "cp1252" in m.could_be_from_charset), None)
    if western is not None and western.chaos <= best.chaos + WESTERN_MARGIN:
        return "cp1252"
    return codec_name(best.encoding)


def _check_decodes(path: Path, codec: str) -> None:
    """Decode the whole file in pieces; at a bad byte, raise NotText with its line within the file."""
    decoder = codecs.getincrementaldecoder(codec)()
    newlines = 0
    try:
        with path.open("rb") as f:
            while True:
                chunk = f.read(_READ_CHUNK)
                state = decoder.getstate()
                try:
                    newlines += decoder.decode(chunk, final=not chunk).count("\n")
                except UnicodeDecodeError as e:
                    # Decode the piece again, marking bad bytes: the newlines before the first mark.
                    marked = codecs.getincrementaldecoder(codec)(errors=_MARK_ERRORS)
                    marked.setstate(state)
                    text = marked.decode(chunk, final=not chunk)
                    newlines += text.count("\n", 0, text.find(_MARK))
                    raise NotText(f"not {codec} text ({e.reason})", newlines + 1) from e
                if not chunk:
                    return
    except OSError as e:
        raise NotText(f"cannot read ({e.strerror or e})") from e
