"""`RemoteModel`: generate with a model whose layers live on swarm peers, surviving peer failures.

The client holds the token embeddings, the final norm and the head (Petals' split): only hidden states
(bf16 by default, ~1 KB per token for SmolLM2) cross the network, and the prompt never leaves this
machine as text. Sampling and stopping are the engine's own (`Sequence.sample_token`, `StopChecker`),
so a generation here gives what `swarmlm serve` gives for the same request. The swarm side (routes,
bans, failover, verification) is the `RemoteSequenceManager`'s and its sessions'.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Iterator, Sequence

import torch
from hivemind import DHT

from swarmlm.engine.sampling import SamplingParams, choice_generator
from swarmlm.engine.sequence import Sequence as GeneratedSequence
from swarmlm.engine.sequence import StepOutput
from swarmlm.engine.stopping import StopChecker
from swarmlm.model.loading import load_model
from swarmlm.swarm.inference_session import InferenceSession
from swarmlm.swarm.remote_training import RemoteCausalLM
from swarmlm.swarm.sequence_manager import ClientConfig, RemoteSequenceManager, SwarmStats
from swarmlm.swarm.span_record import SpanRecord

__all__ = ["ClientConfig", "RemoteModel"]


class RemoteModel:
    """A model served by a swarm, used like a local one.

    model = RemoteModel(initial_peers=["/ip4/…/p2p/…"])
    ids = model.generate(model.tokenizer.encode("Hello"), SamplingParams(max_tokens=20, temperature=0))
    """

    def __init__(
        self,
        model: str | None = None,
        initial_peers: Sequence[str] = (),
        *,
        dht: DHT | None = None,
        config: ClientConfig | None = None,
    ) -> None:
        self.config = config or ClientConfig()
        # Embeddings, final norm and head: on the CPU, where the wire's tensors are, whatever the machine has.
        self.local = load_model(model, layers=(0, 0), device="cpu")
        self.model_id, self.tokenizer, self.config_model = self.local.model_id, self.local.tokenizer, self.local.config
        self.stopper = StopChecker(self.tokenizer, self.config_model.max_position_embeddings, self.config.max_model_len)
        self.manager = RemoteSequenceManager(
            self.model_id, self.config_model.num_layers, initial_peers, dht=dht, config=self.config
        )

    # ----- the swarm as the manager sees it --------------------------------------------------------
    @property
    def dht(self) -> DHT:
        return self.manager.dht

    @property
    def stats(self) -> SwarmStats:
        return self.manager.stats

    @property
    def sessions(self) -> set[InferenceSession]:
        return self.manager.sessions

    def records(self) -> list[SpanRecord]:
        return self.manager.records()

    def routable_records(self) -> list[SpanRecord]:
        return self.manager.routable_records()

    def model_version(self, records: list[SpanRecord]) -> dict[str, str] | None:
        return self.manager.model_version(records)

    def banned_peers(self) -> set[str]:
        return self.manager.banned_peers()

    def active_peers(self) -> dict[str, int]:
        return self.manager.active_peers()

    # ----- fine-tuning -----------------------------------------------------------------------------
    def fine_tuning(
        self,
        *,
        prompt_tokens: int = 0,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        train_head: bool = False,
        seed: int = 0,
    ) -> RemoteCausalLM:
        """A trainable module over this swarm's layers: prompt embeddings, LoRA adapters and optionally
        the head train here, the peers' weights stay frozen (remote_training.py). Use a ClientConfig
        with wire_dtype="fp32" for the same numbers as training in one process."""
        return RemoteCausalLM(
            copy.deepcopy(self.local.span),  # its own: training may untie the head from the embeddings
            self.manager,
            self.model_id,
            prompt_tokens=prompt_tokens,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            train_head=train_head,
            seed=seed,
        )

    # ----- generation ------------------------------------------------------------------------------
    def inference_session(self, max_length: int | None, adapter: str | None = None) -> InferenceSession:
        """A session of one sequence of `max_length` tokens (with LoRA adapter `adapter`), or (None) of rows
        added to it later."""
        return InferenceSession(self.manager, max_length, adapter)

    def stream(
        self, prompt_ids: list[int], params: SamplingParams, *, choice: int = 0, adapter: str | None = None
    ) -> Iterator[int]:
        """Yield the generated token ids of choice `choice` of this request (seeded as the engine seeds it)
        one by one, up to where `swarmlm serve` would stop: a stop token or EOS, a stop string (the token
        that completes it is the last), `max_tokens`, or the context. With `adapter`, the peers apply that
        LoRA adapter (`swarmlm peer --adapters`). ValueError, at once, for a request the context cannot
        hold."""
        self.stopper.validate(prompt_ids, params)
        outs = self._decode(prompt_ids, params, choice, adapter)
        return (out.token_id for out in outs if out.token_id is not None)

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, *, choice: int = 0, adapter: str | None = None
    ) -> list[int]:
        return list(self.stream(prompt_ids, params, choice=choice, adapter=adapter))

    def complete(
        self, prompt_ids: list[int], params: SamplingParams, n: int = 1, adapter: str | None = None
    ) -> list[GeneratedSequence]:
        """The request's n choices, one after another, as the engine reports them: each one's `output_ids`,
        `text` (cut before a stop string) and `finish_reason`."""
        self.stopper.validate(prompt_ids, params)
        return [[*self._decode(prompt_ids, params, i, adapter)][-1].seq for i in range(n)]

    @torch.inference_mode()
    def _decode(
        self, prompt_ids: list[int], params: SamplingParams, choice: int, adapter: str | None
    ) -> Iterator[StepOutput]:
        """The engine's decode loop for one sequence, with its layers run by a session through the swarm."""
        span = self.local.span
        request_id = f"remote-{uuid.uuid4().hex[:8]}"
        seq = GeneratedSequence(
            request_id, choice, list(prompt_ids), params, "", time.monotonic(), choice_generator(params, choice)
        )
        with self.inference_session(len(prompt_ids) + params.max_tokens, adapter) as session:
            new = seq.prompt_ids
            while not seq.finished:
                hidden = session.step(span.embed(torch.tensor(new)))
                token, logprob = seq.sample_token(span.head(hidden[-1:])[0].cpu())
                seq.finish_reason = self.stopper.check(seq)
                yield StepOutput(seq, token, self.stopper.take_text(seq), logprob)
                new = [token]

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> RemoteModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
