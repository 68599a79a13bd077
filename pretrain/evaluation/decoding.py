"""`generate_until`: the sampler that matches the training objective, with stop sequences.

Requests are batched by prompt length (the samplers take one prompt length per batch, and a
bidirectional model must not see padding), greedy requests together; a request that samples
(temperature > 0) decodes alone with a generator keyed by its prompt, so that its text does not
depend on its batch. Objectives whose tokens never see later positions (`block`: block-causal
attention; `ar`: causal) decode chunk by chunk and stop once every row of the batch has hit a stop
sequence or eos: the same tokens as one full-length call, in less time. A bidirectional model sees
the masks of the whole generation span, so it decodes the full span at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pretrain.errors import ConfigError
from pretrain.evaluation.estimator import request_generator

CAUSAL_CHUNK = 16
"""Tokens per sampler call for the `ar` objective (any value gives the same tokens)."""


def objective_decoder(model):
    """(generate, model_fn, defaults) of an `EvalModel`: the sampler, the network as the sampler
    calls it under the objective's generation pattern and shift, and the decode options that
    match training (`decode_defaults`). The one place this package takes the samplers from."""
    from pretrain.diffusion.objective import build_objective
    from pretrain.evaluation.backends import logits_fn
    from pretrain.sampling.sampler import generate

    objective = build_objective(model.diffusion, mask_id=model.mask_id, seq_len=model.seq_len)
    return generate, logits_fn(model.net, objective), objective.decode_defaults(model.seq_len)


@dataclass(frozen=True)
class DecodeOptions:
    """Model arguments of `generate_until` (None: what the objective trained with)."""

    steps: int | None = None
    """Sampler calls for the whole generation (tokens per step = ceil(length / steps))."""
    block_length: int | None = None
    tokens_per_step: int | None = None
    gen_length: int = 256
    """Tokens generated when the task sets no `max_gen_toks`."""


@dataclass(frozen=True)
class GenRequest:
    context: tuple[int, ...]
    until: tuple[str, ...]
    max_tokens: int
    temperature: float


class Decoder:
    def __init__(self, model, options: DecodeOptions, *, batch_size: int, seed: int):
        self.model, self.options = model, options
        self.batch_size, self.seed = batch_size, seed
        generate, self.model_fn, self.defaults = objective_decoder(model)
        self.generate = generate
        objective = model.diffusion.objective
        self.causal = objective in ("ar", "block")
        self.block = model.diffusion.block_length if objective == "block" else None
        self.seconds = 0.0

    def request(self, context: str, gen_kwargs: dict) -> GenRequest:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        # no longer than the model was trained on, with a token of prompt
        max_tokens = min(
            int(kwargs.pop("max_gen_toks", self.options.gen_length)), self.model.seq_len - 1
        )
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if not kwargs.pop("do_sample", temperature > 0):
            temperature = 0.0
        return GenRequest(tuple(self.model.encode(context)), tuple(until), max_tokens, temperature)

    def sampler_options(self, gen_length: int) -> dict:
        opts = dict(self.defaults)
        o = self.options
        if o.steps is not None and o.tokens_per_step is not None:
            raise ConfigError("model args: give steps or tokens_per_step, not both")
        if o.block_length is not None:
            if self.block is not None and o.block_length != self.block:
                raise ConfigError(
                    f"block_length: a block-diffusion model decodes its trained blocks of "
                    f"{self.block}, got {o.block_length}"
                )
            opts["block_length"] = o.block_length
        if o.steps is not None:
            opts["tokens_per_step"] = max(1, math.ceil(gen_length / o.steps))
        elif o.tokens_per_step is not None:
            opts["tokens_per_step"] = o.tokens_per_step
        opts.setdefault("tokens_per_step", 1)
        return opts

    def run(self, requests: Sequence[GenRequest]) -> list[str]:
        start = time.perf_counter()
        out: dict[int, str] = {}
        order = sorted(range(len(requests)), key=lambda i: self._key(requests[i]))
        batch: list[int] = []
        for i in order:
            if batch and (
                self._key(requests[batch[0]])[:3] != self._key(requests[i])[:3]
                or len(batch) == self.batch_size
                or requests[i].temperature > 0
            ):
                out.update(self._decode([requests[j] for j in batch], batch))
                batch = []
            batch.append(i)
        if batch:
            out.update(self._decode([requests[j] for j in batch], batch))
        self.seconds += time.perf_counter() - start
        return [out[i] for i in range(len(requests))]

    def _key(self, r: GenRequest):
        return (len(self._prompt(r)), r.max_tokens, r.temperature, r.until, r.context)

    def _prompt(self, r: GenRequest) -> list[int]:
        """The prompt, its oldest tokens dropped to fit the generation in the training length;
        for block diffusion left-padded with eos (a document boundary) to a block boundary."""
        keep = max(1, self.model.seq_len - r.max_tokens)
        prompt = list(r.context[-keep:]) or [self.model.eos_id]
        if self.block:
            prompt = [self.model.eos_id] * (-len(prompt) % self.block) + prompt
        return prompt

    @torch.no_grad()
    def _decode(self, batch: list[GenRequest], ids: list[int]) -> dict[int, str]:
        first = batch[0]
        x = torch.tensor([self._prompt(r) for r in batch], dtype=torch.long)
        x = x.to(self.model.device)
        prompt_len = x.shape[1]
        opts = self.sampler_options(first.max_tokens)
        generator = None
        if first.temperature > 0:  # on the model's device, as the sampler draws there
            seed = request_generator(self.seed, first.context, first.max_tokens).initial_seed()
            generator = torch.Generator(device=x.device).manual_seed(seed)
        chunk = first.max_tokens
        if self.causal:
            chunk = self.block or CAUSAL_CHUNK
        done = 0
        while done < first.max_tokens:
            step = min(chunk, first.max_tokens - done)
            x = self.generate(
                self.model_fn,
                x,
                gen_length=step,
                mask_id=self.model.mask_id,
                temperature=first.temperature,
                generator=generator,
                **opts,
            )
            done += step
            rows = zip(batch, x, strict=True)
            if self.causal and all(self._stopped(r, row[prompt_len:]) for r, row in rows):
                break
        rows = zip(ids, batch, x, strict=True)
        return {i: self._text(r, row[prompt_len:]) for i, r, row in rows}

    def _cut(self, r: GenRequest, tokens: torch.Tensor) -> tuple[str, bool]:
        """Text up to the first eos and the first stop sequence; whether either was reached."""
        ids = tokens.tolist()
        stopped = self.model.eos_id in ids
        if stopped:
            ids = ids[: ids.index(self.model.eos_id)]
        text = self.model.decode(ids)
        for stop in r.until:
            if stop and stop in text:
                text, stopped = text[: text.index(stop)], True
        return text, stopped

    def _stopped(self, r: GenRequest, tokens) -> bool:
        return self._cut(r, tokens)[1]

    def _text(self, r: GenRequest, tokens) -> str:
        return self._cut(r, tokens)[0]
