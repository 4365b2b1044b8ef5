"""Text-only beam search (``num_beams > 1``): a decoding loop of its own over the engine's cache and
span grammar, separate from the sampling state machine, which it shares nothing else with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from unimodal.data.processor import EncodedDocument
from unimodal.inference.cache import KVCache, padded_ids
from unimodal.inference.constraints import OUTSIDE
from unimodal.inference.modes import MediaMode
from unimodal.inference.outputs import Deadline, Generation, Segment, expired_error, expiry
from unimodal.inference.sampling import apply_repetition_penalty
from unimodal.models.generation import GenerationSettings
from unimodal.models.unified import UnifiedModel


class BeamEngine(Protocol):
    """What beam search reads from the engine (``unimodal.inference.engine.Engine``)."""

    model: UnifiedModel
    pad_id: int
    device: torch.device
    modes: dict[int, MediaMode]
    stop_ids: set[int]
    text_ban: torch.Tensor

    def constrain(self, scores: torch.Tensor, states: Sequence[tuple], in_text: list[int]) -> torch.Tensor: ...

    def text_segment(self, ids: list[int], stop: Sequence[str], cut_short: bool = False) -> tuple[str, bool]: ...


def beam_search(
    engine: BeamEngine,
    prompts: Sequence[EncodedDocument],
    budgets: list[int],
    settings: GenerationSettings,
    seeds: list[int],
    deadlines: list[Deadline],
) -> list[Generation]:
    """Text-only beam search (media begin tokens are forbidden), scored like transformers'
    ``generate(num_beams=K)``: summed log-probabilities over length ** 1, stopping once K
    hypotheses are finished and no running beam can beat the worst of them.

    A hypothesis ends at an end token or where its text completes a stop string, and is no
    longer than the text ``max_tokens``. A row past its deadline leaves with its best finished
    hypothesis, or else its best running beam (beams are kept best first); when every row has,
    :class:`GenerationTimeout` is raised."""
    k, batch = settings.text.num_beams, len(prompts)
    cap = settings.text.max_tokens
    budgets = [min(b, cap) if cap is not None else b for b in budgets]
    cache = KVCache(engine.model, prompts, engine.pad_id)
    cache.reorder(torch.arange(batch, device=engine.device).repeat_interleave(k))
    ids, valid = padded_ids(prompts, engine.pad_id, engine.device)
    ids, valid = ids.repeat_interleave(k, 0), valid.repeat_interleave(k, 0)
    ban = engine.text_ban.clone()
    ban[list(engine.modes)] = True
    beam_scores = torch.zeros(batch, k, device=engine.device)
    beam_scores[:, 1:] = -1e9
    tokens: list[list[int]] = [[] for _ in range(batch * k)]
    finished: list[list[tuple[float, list[int], bool]]] = [[] for _ in range(batch)]
    done = [False] * batch
    expired: list[str | None] = [None] * batch
    partial: dict[int, list[int]] = {}  # an expired row's best running beam
    step = 0
    while not all(done):
        for b in range(batch):
            if not done[b] and (reason := expiry(deadlines[b])):
                # kept now: a row that is done feeds placeholders into its beams from here on
                done[b], expired[b], partial[b] = True, reason, tokens[b * k]
        if all(expired):
            raise expired_error(expired)
        if all(done):
            break
        # the order of transformers' beam search: log-softmax, repetition penalty, other processors
        logprobs = engine.model.logits(cache.last).log_softmax(-1)
        logprobs = apply_repetition_penalty(logprobs, ids, valid, settings.text.repetition_penalty)
        # beams write text only: every row is outside a media span
        logprobs = engine.constrain(logprobs, [OUTSIDE] * len(logprobs), []).masked_fill(ban, float("-inf"))
        total = (logprobs + beam_scores.view(-1, 1)).view(batch, -1)
        top_scores, top_index = total.topk(2 * k, dim=1)
        vocab = logprobs.shape[-1]
        sources, next_tokens, next_scores = [], [], []
        for b in range(batch):
            chosen: list[tuple[int, int, float]] = []
            last_step = step + 1 >= budgets[b]
            for rank, (score, index) in enumerate(zip(top_scores[b].tolist(), top_index[b].tolist())):
                if done[b]:
                    break
                source, token = b * k + index // vocab, index % vocab
                ends = token in engine.stop_ids
                stopped = not ends and bool(settings.stop) and engine.text_segment(tokens[source] + [token], settings.stop)[1]
                if ends or stopped or last_step:
                    if rank < k:
                        _add_hypothesis(finished[b], k, score / (step + 1), tokens[source] + ([] if ends else [token]), ends)
                    continue
                chosen.append((source, token, score))
                if len(chosen) == k:
                    break
            while len(chosen) < k:  # a finished item keeps feeding placeholders
                chosen.append((b * k, engine.pad_id, -1e9))
            for source, token, score in chosen:
                sources.append(source)
                next_tokens.append(token)
                next_scores.append(score)
            if not done[b]:
                best_running = max(s for _, _, s in chosen)
                full = len(finished[b]) == k
                done[b] = last_step or (full and best_running / (step + 1) <= min(h[0] for h in finished[b]))
        step += 1
        if all(done):
            break
        index = torch.tensor(sources, device=engine.device)
        cache.reorder(index)
        ids, valid = ids[index], valid[index]
        tokens = [tokens[s] + [t] for s, t in zip(sources, next_tokens)]
        beam_scores = torch.tensor(next_scores, device=engine.device).view(batch, k)
        new = torch.tensor(next_tokens, device=engine.device)[:, None]
        live = torch.tensor([not done[i // k] for i in range(batch * k)], device=engine.device)[:, None]
        ids, valid = torch.cat([ids, new], 1), torch.cat([valid, live], 1)
        cache.step(cache.embed_tokens(new), None if all(not d for d in done) else live, torch.zeros_like(new))
    out = []
    for b, prompt in enumerate(prompts):
        if expired[b] and not finished[b]:
            best, ended = partial[b], False
        else:
            _, best, ended = max(finished[b], key=lambda h: h[0])
        text, stopped = engine.text_segment(best, settings.stop, cut_short=not ended)
        finish = expired[b] or ("stop" if ended or stopped else "length")
        segments = [Segment("text", text, ids=best)] if text else []
        # the end token is not counted, as sampling does not count it
        out.append(Generation(segments, finish, len(prompt), len(best), seeds[b]))
    return out


def _add_hypothesis(pool: list[tuple[float, list[int], bool]], k: int, score: float, tokens: list[int], ended: bool) -> None:
    if len(pool) < k:
        pool.append((score, tokens, ended))
    elif score > min(h[0] for h in pool):
        pool.remove(min(pool, key=lambda h: h[0]))
        pool.append((score, tokens, ended))
