"""When a sequence stops, and how much of its text may be shown yet: the rules of every decode loop.

The engine (`Engine.step`) and the swarm client (`RemoteModel.stream`) decode with the same object, so
a request stops at the same token, with the same text, wherever its layers run.
"""

from __future__ import annotations

from swarmlm.engine.sampling import SamplingParams
from swarmlm.engine.sequence import FinishReason, Sequence
from swarmlm.model.tokenizer import Tokenizer


class StopChecker:
    """Stop token ids (and EOS unless `ignore_eos`), stop strings, `max_tokens` and the context length."""

    def __init__(self, tokenizer: Tokenizer, context: int, max_model_len: int | None = None) -> None:
        """`context`: the model's own length; `max_model_len` may only shorten it."""
        self.tokenizer = tokenizer
        self.max_model_len = min(max_model_len or context, context)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError, with a message for the client, for a request the context cannot hold: every
        accepted request can run to `max_tokens`."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"the model's context of {self.max_model_len} tokens"
            )

    def check(self, seq: Sequence) -> FinishReason | None:
        """Why `seq` stops after its newest output token, or None. Decodes its text, cut before a stop
        string found in it."""
        params = seq.params
        token = seq.output_ids[-1]
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.tokenizer.eos_token_ids):
            return FinishReason.STOP  # the stop token's own text is never shown
        seq.text = self.tokenizer.decode(seq.output_ids)
        if self._cut_at_stop_string(seq):
            return FinishReason.STOP
        if len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _cut_at_stop_string(self, seq: Sequence) -> bool:
        longest = max((len(s) for s in seq.params.stop), default=0)
        if not longest:
            return False
        window_start = max(0, seq.emitted - longest)  # text shown already held no stop string
        hits = [i for s in seq.params.stop if (i := seq.text.find(s, window_start)) >= 0]
        if not hits:
            return False
        seq.text = seq.text[: min(hits)]
        return True

    def take_text(self, seq: Sequence) -> str:
        """New text to report, holding back an incomplete character or a possible stop-string start
        (until the sequence finishes)."""
        end = len(seq.text)
        if not seq.finished:
            if seq.text.endswith("\ufffd"):
                end = len(seq.text.rstrip("\ufffd"))
            longest = max((len(s) for s in seq.params.stop), default=0)
            end = max(seq.emitted, end - max(0, longest - 1))
        delta = seq.text[seq.emitted : end]
        seq.emitted = end
        return delta
