"""Structured output: a JSON schema (or any JSON object) enforced while decoding, by llguidance.

Each constrained sequence holds a `TokenMatcher`; before its token is drawn, the tokens the grammar does
not allow next get -inf logits, and the drawn token then advances the matcher. Once the answer is
complete only the end-of-sequence token is allowed, so it stops as a free sequence does. Constrained and
free sequences share the engine's steps: only the sampling of a constrained row changes.

Why llguidance: `make bench-grammar` (bench/grammar_bench.py) measured llguidance, xgrammar and
outlines-core on the embedded 49,152-token vocabulary: all three compute a token's mask in 4-42 µs,
against 15-30 ms a decode step; outlines-core compiles a schema in 40-230 ms (llguidance, xgrammar: 1-2
ms) and xgrammar depends on triton and a TVM runtime; llguidance is one dependency-free wheel (used by
vLLM and llama.cpp). Its tokenizer setup (0.45 s on an idle machine, 3-4 s on busy cores) runs once per
process, on the first constrained request.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import llguidance
import torch
from torch import Tensor

from swarmlm.model.tokenizer import Tokenizer

# Compact JSON spelled as json.dumps spells it: a model cannot spend its tokens on whitespace. (Inside a
# Lark grammar's %json, the schema's "x-guidance" key carries the same.)
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# bit i of byte b (a little-endian view of llguidance's int32 mask words) allows token 8b + i
_BITS = ((torch.arange(256).view(-1, 1) >> torch.arange(8)) & 1).bool()


class GrammarError(ValueError):
    """A schema that cannot constrain decoding (malformed, unsupported or unsatisfiable)."""


def apply_bitmask(logits: Tensor, mask: Tensor) -> None:
    """-inf in `logits` (one row) wherever the bitmask (int32 words or their bytes) disallows a token.
    llguidance's own CPU apply took 4-16 ms a row here; this lookup some 0.2 ms."""
    allowed = _BITS[mask.view(torch.uint8).flatten().long()].flatten()[: logits.shape[-1]]
    logits.masked_fill_(~allowed, float("-inf"))


class Grammars:
    """Compiles schemas against one tokenizer; thread-safe (the API compiles on its worker threads)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        """`vocab_size`: the model's logits width (may exceed the tokenizer's: the rest is never allowed)."""
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._ll: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def _ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                import llguidance.hf  # it imports transformers (2.5 s): not in a peer that never constrains

                eos = self.tokenizer.eos_token_ids[0] if self.tokenizer.eos_token_ids else None
                self._ll = llguidance.hf.from_tokenizer(self.tokenizer.hf, n_vocab=self.vocab_size, eos_token=eos)
            return self._ll

    def json_schema(self, schema: dict[str, Any] | bool) -> Grammar:
        """A grammar for JSON that validates against `schema` ({"type": "object"}: any JSON object)."""
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_STYLE)
        except Exception as e:  # llguidance's parser raises several kinds for what it refuses
            raise GrammarError(f"not a usable JSON schema: {e}") from None
        return self._compiled(text)

    def lark(self, source: str) -> Grammar:
        """A grammar in llguidance's Lark dialect (`%json {schema}` embeds a JSON schema)."""
        try:
            text = llguidance.LLMatcher.grammar_from_lark(source)
        except Exception as e:  # as above
            raise GrammarError(f"not a usable grammar: {e}") from None
        return self._compiled(text)

    def _compiled(self, text: str) -> Grammar:
        tokenizer = self._ll_tokenizer()
        # what llguidance refuses only once it builds the parser (unsatisfiable, bad $ref, ...)
        if error := llguidance.LLMatcher.validate_grammar(text, tokenizer):
            raise GrammarError(error)
        return Grammar(tokenizer, text, self.vocab_size)


class Grammar:
    """A compiled grammar: each sequence constrained by it takes its own `matcher()`."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, text: str, vocab_size: int) -> None:
        self.tokenizer, self.text, self.vocab_size = tokenizer, text, vocab_size

    def matcher(self) -> TokenMatcher:
        return TokenMatcher(self)


class TokenMatcher:
    """One sequence's place in its grammar."""

    def __init__(self, grammar: Grammar) -> None:
        self.ll = llguidance.LLMatcher(grammar.tokenizer, grammar.text)
        if self.ll.is_error():
            raise GrammarError(self.ll.get_error())
        self.mask = torch.empty((grammar.vocab_size + 31) // 32, dtype=torch.int32)  # one bit a token

    def constrain_(self, logits: Tensor) -> None:
        """-inf for every token the grammar does not allow next (one row of logits, on the host)."""
        # Into our own buffer, as llguidance.torch's helper does: importing that module runs torch.compile
        # (4 s of every process start).
        self.ll.unsafe_compute_mask_ptr(self.mask.data_ptr(), self.mask.numel() * self.mask.element_size())
        apply_bitmask(logits, self.mask)

    def consume(self, token: int) -> None:
        """Advance past the drawn token (one `constrain_` allowed)."""
        if not self.ll.consume_token(token):
            raise GrammarError(f"token {token} broke the grammar: {self.ll.get_error()}")
