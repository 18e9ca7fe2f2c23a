"""Tokenizer and chat template from the same source as the weights (GGUF metadata or an HF directory)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarmlm.model.checkpoint import CheckpointError, HFCheckpoint
from swarmlm.model.gguf_checkpoint import GGUFCheckpoint

if TYPE_CHECKING:  # transformers is imported where a tokenizer is built: a peer serving blocks never needs it
    from transformers import PreTrainedTokenizerFast

# GGUF token types (llama.cpp's llama_token_type): control and user-defined tokens are never split.
_GGUF_SPECIAL_TYPES = {3, 4}


class Tokenizer:
    """Encodes, decodes, and renders chat prompts; knows the model's stop tokens."""

    def __init__(self, hf: PreTrainedTokenizerFast, eos_token_ids: Sequence[int], add_bos: bool) -> None:
        self.hf = hf
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        self.add_bos = add_bos and hf.bos_token_id is not None

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The text's tokens, after the model's BOS token where it wants one (`add_special_tokens`)."""
        ids = self.hf.encode(text, add_special_tokens=False)
        bos = self.hf.bos_token_id
        # Chat templates often write the BOS token themselves: never add a second one.
        return [bos, *ids] if add_special_tokens and self.add_bos and ids[:1] != [bos] else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """`messages` rendered by the chat template, up to the assistant's turn; `tools` (OpenAI's
        function definitions) given to the template, which lists them if it supports tools."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use /v1/completions")
        return self.hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)


def load_tokenizer(ckpt: GGUFCheckpoint | HFCheckpoint) -> Tokenizer:
    if isinstance(ckpt, HFCheckpoint):
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(ckpt.path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{ckpt.path}: no usable tokenizer ({e})") from e
        eos = list(ckpt.config.eos_token_ids) or [hf.eos_token_id]
        return Tokenizer(hf, eos, add_bos=bool(getattr(hf, "add_bos_token", False)))
    return _gguf_tokenizer(ckpt)


def _gguf_tokenizer(ckpt: GGUFCheckpoint) -> Tokenizer:
    """Build a byte-level BPE tokenizer straight from GGUF metadata.

    transformers can convert GGUF tokenizers too but takes ~15 s for a 49k vocabulary; building the
    `tokenizers` pipeline directly takes a fraction of a second. Pre-tokenizers we do not know fall
    back to transformers' converter.
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    g = ckpt.field
    if g("tokenizer.ggml.model") != "gpt2":
        return _transformers_gguf_tokenizer(ckpt)
    pre = g("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt2"):
        pre_tok = byte_level
    else:
        return _transformers_gguf_tokenizer(ckpt)
    tokens: list[str] = g("tokenizer.ggml.tokens")
    types: list[int] = g("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in g("tokenizer.ggml.merges")]
    raw = RawTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    raw.pre_tokenizer = pre_tok
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(
        [AddedToken(t, special=True) for t, ty in zip(tokens, types, strict=True) if ty in _GGUF_SPECIAL_TYPES]
    )

    def tok(key: str) -> str | None:
        i = g(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None else None

    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=tok("bos"),
        eos_token=tok("eos"),
        unk_token=tok("unknown"),
        pad_token=tok("padding"),
    )
    hf.chat_template = g("tokenizer.chat_template")
    return Tokenizer(hf, ckpt.config.eos_token_ids, add_bos=bool(g("tokenizer.ggml.add_bos_token", False)))


def _transformers_gguf_tokenizer(ckpt: GGUFCheckpoint) -> Tokenizer:
    from transformers import AutoTokenizer

    path = Path(ckpt.path)
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    add_bos = bool(ckpt.field("tokenizer.ggml.add_bos_token", False))
    return Tokenizer(hf, ckpt.config.eos_token_ids or (hf.eos_token_id,), add_bos=add_bos)
