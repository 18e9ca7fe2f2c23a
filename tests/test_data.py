"""The training data pipeline: cleaning counts, tokenizers, shards and their checksums, batches, the CLI."""

from __future__ import annotations

import codecs
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from swarmlm.train.data import (
    DataError,
    Manifest,
    SkippedFile,
    TokenShards,
    default_corpus_files,
    load_data_tokenizer,
    prepare,
)

# Each document of the corpus below as cleaning should leave it (before tokenizing).
CLEAN_DOCS = [
    "Hello world again, said the first line\nCafé au lait, served warm at dawn\nBell rings here now\nExit.\nExit.",
    "# Title\nSome markdown text.",
    "Body line one of the Gutenberg text.\nBody line two.",
    "First record.\nSecond line of it.",
    "New words here.",
]


def write_corpus(root: Path) -> list[Path]:
    """A small corpus exercising every cleaning rule: a text file (CRLF, BOM), a folder with Markdown, a
    Project Gutenberg text and files to ignore, and a JSONL file with malformed records."""
    root.mkdir(parents=True, exist_ok=True)
    a = root / "a.txt"
    a.write_bytes(
        "\r\n".join(
            [
                "\ufeffHello   world\t again, said the first line",  # BOM stripped, whitespace collapsed: kept
                "",  # empty
                "   ",  # empty
                "x",  # near-empty (one character)
                "Cafe\u0301 au lait, served warm at dawn",  # NFC: "Café" (precomposed): kept
                "Bell\x07 rings\x00 here\x0bnow",  # controls removed, vertical tab -> space: kept
                "Exit.",  # short lines repeat legitimately (speaker tags, stage directions):
                "Exit.",  # both kept
                "Hello world again, said the first line",  # duplicate of line 1 once cleaned
                "Caf\u00e9 au lait, served warm at dawn",  # duplicate of line 5 once normalized
                " ] ",  # near-empty
            ]
        ).encode()
    )
    docs = root / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / ".hidden").mkdir()
    # 1 empty, 1 duplicate
    (docs / "b.md").write_text("# Title\n\nSome markdown text.\nHello world again, said the first line\n")
    (docs / "sub" / "c.txt").write_text(
        "The Project Gutenberg eBook of Nothing\n"
        "Release date: never\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK NOTHING ***\n"
        "Body line one of the Gutenberg text.\n"
        "Body line two.\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK NOTHING ***\n"
        "License text.\n"
    )
    (docs / "ignored.csv").write_text("not,a,text,source\n")
    (docs / ".hidden" / "d.txt").write_text("hidden files are skipped\n")
    jsonl = root / "e.jsonl"
    jsonl.write_text(
        "\n".join(
            [
                json.dumps({"text": "First record.\nSecond line of it."}),
                json.dumps({"text": 42}),  # bad: text is not a string
                "{broken",  # bad: not JSON
                "",  # blank: not a record
                json.dumps({"text": "Body line one of the Gutenberg text.\n\nNew words here."}),  # 1 duplicate, 1 empty
                json.dumps({"other": "no text"}),  # bad: no text field
                json.dumps({"text": "Hello world again, said the first line"}),  # all duplicate: not a document
            ]
        )
        + "\n"
    )
    return [a, docs, jsonl]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ASCII document of a few thousand characters, every line distinct."""
    path = tmp_path_factory.mktemp("story") / "story.txt"
    path.write_text("\n".join(f"Line {i}: the swarm of peers trained on batch number {i * 7}." for i in range(120)))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, story: Path) -> Path:
    """A small data directory with a trained tokenizer and several shards per split."""
    out = tmp_path_factory.mktemp("trained")
    prepare([story], out, train_tokenizer=300, block_size=16, val_fraction=0.2, shard_blocks=20)
    return out


def test_cleaning_counts_and_text(corpus: list[Path], tmp_path: Path) -> None:
    m = prepare(corpus, tmp_path / "out", train_tokenizer=300, block_size=1, val_fraction=0.0)
    st = m.stats
    assert (st.files, st.documents, st.bad_jsonl_lines) == (4, 5, 3)
    assert (st.lines_read, st.lines_kept, st.empty_dropped, st.duplicates_removed, st.boilerplate_dropped) == (
        28,
        12,
        6,
        5,
        5,
    )
    assert st.characters == sum(map(len, CLEAN_DOCS))
    # block_size 1 and no validation: the train shards hold the whole stream, documents ended by <|endoftext|>.
    ts = TokenShards.open(tmp_path / "out")
    assert (len(ts), st.tokens, st.tail_tokens_dropped, st.val_blocks) == (st.train_blocks, st.train_blocks, 0, 0)
    ids = ts.blocks(range(len(ts))).reshape(-1).tolist()
    tok = load_data_tokenizer(tmp_path / "out")
    assert tok.hf.decode(ids, skip_special_tokens=False) == "".join(d + "<|endoftext|>" for d in CLEAN_DOCS)
    assert m.eos_id == tok.hf.convert_tokens_to_ids("<|endoftext|>") and m.bos_id is None
    assert m.sources == [str(p) for p in corpus]


def test_deterministic(corpus: list[Path], tmp_path: Path) -> None:
    def run(out: Path) -> dict[str, bytes]:
        prepare(corpus, out, train_tokenizer=300, block_size=8, val_fraction=0.3, shard_blocks=5, seed=3)
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    assert first == second
    assert {"manifest.json", "train-00000.bin", "val-00000.bin", "tokenizer/tokenizer.json"} <= set(first)


def test_trained_round_trip_and_shards(trained: Path, story: Path) -> None:
    m = Manifest.load(trained)
    assert m.tokenizer == {"kind": "trained", "path": "tokenizer"} and m.dtype == "uint16"
    assert m.vocab_size <= 300 and len(m.splits["train"]) > 1 and m.stats.val_blocks >= 1
    ts = TokenShards.open(trained)
    tok = load_data_tokenizer(trained)
    text = story.read_text()
    first = tok.decode(ts[0].tolist())
    assert ts[0].dtype == torch.long and ts[0].shape == (16,)
    assert first in text and len(first) > 16
    # Blocks across shard boundaries come back in order and equal their single reads.
    picked = [0, 19, 20, 21, len(ts) - 1, -1]
    assert torch.equal(ts.blocks(picked), torch.stack([ts[i] for i in picked]))
    assert ts.blocks([]).shape == (0, 16)
    with pytest.raises(IndexError):
        ts[len(ts)]


def test_trained_tokenizer_on_default_plays(tmp_path: Path) -> None:
    files = default_corpus_files()
    names = [f.name for f in files]
    assert len(files) >= 30 and names == sorted(names)
    assert all(n.endswith("_gut.txt") for n in names) and "hamlet_gut.txt" in names
    plays = [f for f in files if f.name in ("hamlet_gut.txt", "macbeth_gut.txt")]
    m = prepare(plays, tmp_path, train_tokenizer=512)
    assert m.vocab_size <= 512 and m.dtype == "uint16"
    assert m.stats.files == 2 and m.stats.train_blocks > 100 and m.stats.val_blocks > 0

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    line = "To be, or not to be, that is the question:"
    assert hf.decode(hf.encode(line, add_special_tokens=False)) == line
    tok = load_data_tokenizer(tmp_path)
    assert tok.encode(line) == hf.encode(line, add_special_tokens=False)
    ts = TokenShards.open(tmp_path)
    assert ts.vocab_size == m.vocab_size and int(ts.blocks(range(len(ts))).max()) < m.vocab_size


def test_model_tokenizer(story: Path, tmp_path: Path) -> None:
    m = prepare([story], tmp_path, block_size=32, val_fraction=0.1)
    assert m.tokenizer == {"kind": "model", "model": "SmolLM2-135M-Instruct"}
    assert (m.vocab_size, m.dtype) == (49152, "uint16")
    tok = load_data_tokenizer(tmp_path)
    assert m.eos_id == tok.hf.convert_tokens_to_ids("<|endoftext|>")  # a document's end, not <|im_end|>
    ts = TokenShards.open(tmp_path)
    text = story.read_text()
    for i in (0, len(ts) - 1):
        assert tok.decode(ts[i].tolist()) in text
    assert m.stats.tokens == len(tok.encode(text)) + 1  # the document and its separator
    val = TokenShards.open(tmp_path, "val")
    assert len(val) == m.stats.val_blocks >= 1 and len(ts) + len(val) == m.stats.tokens // 32


def test_checksums_and_missing_files(trained: Path, tmp_path: Path) -> None:
    flipped = shutil.copytree(trained, tmp_path / "flipped")
    shard = flipped / "train-00001.bin"
    data = bytearray(shard.read_bytes())
    data[5] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-00001\.bin: checksum mismatch"):
        TokenShards.open(flipped)
    TokenShards.open(flipped, "val")  # the other split is intact
    assert len(TokenShards.open(flipped, verify=False)) == Manifest.load(trained).stats.train_blocks

    truncated = shutil.copytree(trained, tmp_path / "truncated")
    (truncated / "val-00000.bin").write_bytes((trained / "val-00000.bin").read_bytes()[:-2])
    with pytest.raises(DataError, match=r"val-00000\.bin: wrong size"):
        TokenShards.open(truncated, "val", verify=False)

    deleted = shutil.copytree(trained, tmp_path / "deleted")
    (deleted / "train-00000.bin").unlink()
    with pytest.raises(DataError, match=r"train-00000\.bin: missing"):
        TokenShards.open(deleted)

    (deleted / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"manifest\.json: missing"):
        TokenShards.open(deleted)
    with pytest.raises(DataError, match="manifest"):
        load_data_tokenizer(deleted)
    (deleted / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid data manifest"):
        TokenShards.open(deleted)


def test_batches_resume_and_parts(trained: Path) -> None:
    ts = TokenShards.open(trained)
    n = len(ts)
    all_blocks = ts.blocks(range(n))

    def rows(t: torch.Tensor) -> list[tuple[int, ...]]:
        return sorted(map(tuple, t.tolist()))

    # Batch p is items [p*B, (p+1)*B) of the per-epoch permutations: batches cross epochs, none is dropped.
    full = [b for _, (_, b) in zip(range(2 * n // 5 + 1), ts.batches(5, seed=7), strict=False)]
    stream = torch.cat(full)
    assert rows(stream[:n]) == rows(all_blocks) and rows(stream[n : 2 * n]) == rows(all_blocks)
    assert not torch.equal(stream[:n], stream[n : 2 * n])  # each epoch its own order

    first = list(zip(range(10), ts.batches(3, seed=7), strict=False))
    assert [pos for _, (pos, _) in first] == list(range(1, 11))
    stop = first[3][1][0]  # position after 4 batches: what a checkpoint would store
    resumed = list(zip(range(6), ts.batches(3, seed=7, start=stop), strict=False))
    for (_, (p1, b1)), (_, (p2, b2)) in zip(first[4:], resumed, strict=True):
        assert p1 == p2 and torch.equal(b1, b2)
    other = next(ts.batches(3, seed=8))[1]
    assert not torch.equal(other, first[0][1][1])

    world = 3
    parts = [ts.part(r, world) for r in range(world)]
    assert sum(len(p) for p in parts) == n
    for r, p in enumerate(parts):
        assert torch.equal(p.blocks(range(len(p))), all_blocks[r::world])  # i % world == rank: disjoint, covering
        assert len(p.part(0, 2)) == (len(p) + 1) // 2
    pos, batch = next(parts[1].batches(2, seed=0))
    assert pos == 1 and batch.shape == (2, 16)
    with pytest.raises(ValueError):
        ts.part(3, 3)
    # A DataLoader worker gets the paths, not a copy of the mapped data.
    copy = pickle.loads(pickle.dumps(parts[2]))
    assert copy._maps is None and torch.equal(copy.blocks(range(len(copy))), all_blocks[2::world])


def test_replaces_old_shards_and_small_corpora(story: Path, tmp_path: Path) -> None:
    prepare([story], tmp_path, train_tokenizer=300, block_size=8, shard_blocks=3)
    assert len(list(tmp_path.glob("train-*.bin"))) > 3
    m = prepare([story], tmp_path, train_tokenizer=300, block_size=8)
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == ["train-00000.bin", "val-00000.bin"]
    assert not list(tmp_path.glob(".*"))  # no temporary files left
    assert len(TokenShards.open(tmp_path)) == m.stats.train_blocks

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Three short lines.\nJust enough for a few blocks.\nOf eight tokens each.")
    m = prepare([tiny], tmp_path / "tiny", train_tokenizer=300, block_size=8, val_fraction=0.01)
    assert m.stats.val_blocks >= 1 and m.stats.train_blocks >= 1  # small corpora still get a validation block
    with pytest.raises(DataError, match="fewer than one block"):
        prepare([tiny], tmp_path / "tiny", train_tokenizer=300, block_size=4096)


def test_bad_inputs(story: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="source not found"):
        prepare([tmp_path / "nope.txt"], tmp_path / "out", train_tokenizer=300)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"(?i)latin1\.txt: not UTF-8"):  # detected unless --encoding says otherwise
        prepare([latin1], tmp_path / "out", train_tokenizer=300, encoding="utf-8", strict=True)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(DataError, match=r"no \*\.txt / \*\.md / \*\.jsonl files"):
        prepare([empty_dir], tmp_path / "out", train_tokenizer=300)
    with pytest.raises(DataError, match="train-tokenizer"):
        prepare([story], tmp_path / "out", train_tokenizer=100)
    with pytest.raises(DataError, match="not both"):
        prepare([story], tmp_path / "out", tokenizer="SmolLM2-135M-Instruct", train_tokenizer=300)
    with pytest.raises(DataError, match="validation fraction"):
        prepare([story], tmp_path / "out", val_fraction=1.0)


def test_dtype_for_large_vocabularies(story: Path, tmp_path: Path) -> None:
    """Token ids are stored little-endian; a vocabulary over 65535 tokens would need uint32."""
    m = prepare([story], tmp_path, train_tokenizer=300, block_size=8)
    raw = np.fromfile(tmp_path / "train-00000.bin", dtype="<u2").reshape(-1, 8)
    assert torch.equal(torch.from_numpy(raw[:1].astype(np.int64)), TokenShards.open(tmp_path).blocks([0]))
    assert m.dtype == "uint16"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "swarmlm.cli", "data", "prepare", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "100"})


def test_cli(corpus: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run_cli(*map(str, corpus), "--out", str(out), "--train-tokenizer", "300", "--block-size", "8")
    assert r.returncode == 0, r.stderr
    for label in ("files", "lines kept", "empty dropped", "duplicates removed", "tokens", "train blocks", "shards"):
        assert label in r.stdout
    assert "Traceback" not in r.stderr
    assert Manifest.load(out).stats.lines_kept == 12

    r = run_cli(str(tmp_path / "missing.txt"), "--out", str(out))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: source not found: {tmp_path / 'missing.txt'}"]
    r = run_cli(str(corpus[0]), "--out", str(out), "--train-tokenizer", "7")
    assert r.returncode == 2 and r.stderr.startswith("error: --train-tokenizer") and "Traceback" not in r.stderr


def png_bytes() -> bytes:
    """A real 4x4 RGB PNG image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes((x * 60, y * 60, 128) * 1) * 1 for y in range(4) for x in range(4))
    header = struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# charset-normalizer alone ranks Baltic cp1257 first for this text (è would become č).
FRENCH = (
    "Le café crème est servi à l'aube, près de la fenêtre où l'été déjà s'achève.\n"
    "Les élèves préfèrent les crêpes et le thé; le maître répète qu'il faut être sérieux.\n"
    "Où est la gare? Derrière l'église, à côté du marché aux légumes.\n"
    "Noël approche et les enfants décorent le sapin avec des guirlandes dorées.\n"
)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real folder: UTF-8, Latin-1 and UTF-16 text, a PNG image named .txt, an empty file, Markdown."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "a-utf8.txt").write_text("A naïve approach to the swarm.\nPeers train together.\n", encoding="utf-8")
    (root / "b-latin1.txt").write_bytes(FRENCH.encode("latin-1"))
    (root / "c-utf16.txt").write_bytes("Grüße aus Köln, die schöne Straße entlang.\n".encode("utf-16"))
    (root / "d-image.txt").write_bytes(png_bytes())
    (root / "e-empty.txt").write_bytes(b"")
    (root / "f-notes.md").write_text("# Notes\n\nMarkdown is text too.\n")
    return root


def test_real_folder_skips_and_reports(mixed_folder: Path, tmp_path: Path) -> None:
    m = prepare([mixed_folder], tmp_path / "out", train_tokenizer=300, block_size=4, val_fraction=0.0)
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    taken = {Path(f["path"]).name: f for f in on_disk["files"]}
    assert {name: f["encoding"] for name, f in taken.items()} == {
        "a-utf8.txt": "utf-8",
        "b-latin1.txt": "cp1252",  # Windows-1252 decodes Latin-1 text alike
        "c-utf16.txt": "utf-16",
        "f-notes.md": "utf-8",
    }
    assert taken["b-latin1.txt"]["bytes"] == len(FRENCH.encode("latin-1"))
    assert (taken["b-latin1.txt"]["documents"], taken["b-latin1.txt"]["lines_kept"]) == (1, 4)
    skipped = {Path(s["path"]).name: s for s in on_disk["skipped"]}
    assert set(skipped) == {"d-image.txt", "e-empty.txt"}
    assert (
        skipped["d-image.txt"]["reason"].startswith("binary data") and skipped["e-empty.txt"]["reason"] == "empty file"
    )
    assert (m.stats.files, m.stats.files_skipped) == (4, 2)

    tok = load_data_tokenizer(tmp_path / "out")
    ts = TokenShards.open(tmp_path / "out")
    text = tok.hf.decode(ts.blocks(range(len(ts))).reshape(-1).tolist())
    for word in ("naïve", "crème", "fenêtre", "Grüße", "Straße", "Markdown is text too."):
        assert word in text


def test_bad_line_is_counted_in_its_own_file(tmp_path: Path) -> None:
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "a.txt").write_text("".join(f"Good line number {i} of the first file.\n" for i in range(1, 8)))
    (folder / "b.txt").write_bytes(b"First line is fine.\nSo is the second.\nThe third has a \xff byte.\nFourth.\n")
    m = prepare([folder], tmp_path / "out", train_tokenizer=300, block_size=4, encoding="utf-8")
    assert m.skipped == [SkippedFile(str(folder / "b.txt"), "not utf-8 text (invalid start byte)", 3)]
    assert [f.path for f in m.files] == [str(folder / "a.txt")]
    # A byte-order mark names the encoding: a bad byte after it is not guessed around.
    bom = tmp_path / "bom.txt"
    bom.write_bytes(codecs.BOM_UTF8 + b"One.\nTwo.\nThree \xff.\n")
    m = prepare([folder / "a.txt", bom], tmp_path / "out", train_tokenizer=300, block_size=4)
    assert m.skipped == [SkippedFile(str(bom), "not utf-8-sig text (invalid start byte)", 3)]
    with pytest.raises(DataError, match=r"all 1 files were skipped, first .*bom\.txt: not utf-8-sig"):
        prepare([bom], tmp_path / "out", train_tokenizer=300, block_size=4)


def test_cli_strict_and_encoding(mixed_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run_cli(str(mixed_folder), "--out", str(out), "--train-tokenizer", "300", "--block-size", "4")
    assert r.returncode == 0, r.stderr
    assert "files skipped" in r.stdout
    assert f"skipped {mixed_folder / 'd-image.txt'}: binary data" in r.stdout
    assert f"skipped {mixed_folder / 'e-empty.txt'}: empty file" in r.stdout

    r = run_cli(str(mixed_folder), "--out", str(out), "--train-tokenizer", "300", "--strict")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(f"error: {mixed_folder / 'd-image.txt'}: binary data")

    r = run_cli(str(mixed_folder), "--out", str(out), "--train-tokenizer", "300", "--encoding", "utf-8", "--strict")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {mixed_folder / 'b-latin1.txt'}: not utf-8 text (invalid continuation byte) (line 1); "
        "without --strict it would be skipped"
    ]
    r = run_cli(str(mixed_folder), "--out", str(out), "--encoding", "klingon")
    assert r.returncode == 2 and r.stderr.startswith("error: --encoding: unknown text encoding 'klingon'")
