"""The one generation engine: a state machine over modes on a batched KV cache.

Every row of a batch is in one mode at a time:

- **text**: the LM head samples with the text settings; a begin token (``<|boi|>``, ``<|boa|>``)
  of a modality the model can write switches mode, every other special token is forbidden;
- **discrete span** (MIO, SEED): codes are sampled under :class:`MediaSpanConstraint`, which
  allows exactly the codes a well-formed span needs and then its end token;
- **causal continuous span** (Orthus): the modality's head samples the next feature from the
  last hidden state (``sample_next``), its clean embedding is committed to the cache, and after
  ``slots_per_item`` features the end token is forced;
- **bidirectional continuous span** (Transfusion, LlamaFusion): the modality denoises a whole
  image (``denoise_block``), calling back into the backbone for the image's slots on top of the
  cached prefix; the cache is cropped back after each call and one clean pass is committed.

The cache holds every row at the same length; which cached positions are real is tracked per row
(``valid``), so left padding, finished rows and rows that sit out another row's step are never
attended. Classifier-free guidance runs a second row per prompt (the unconditional prompt, in the
same batched cache) that follows its partner through each guided span and forgets the span
afterwards. ``Generation`` holds raw outputs (text, codes, features); turning media arrays into
pictures and waveforms is the codecs' job (``unimodal.inference.chat``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from unimodal.data.processor import EncodedDocument
from unimodal.batch import IGNORE_INDEX, PackedBatch
from unimodal.inference.constraints import MediaSpanConstraint, SpanSpec, extract_spans
from unimodal.inference.sampling import apply_repetition_penalty, choose, make_generator
from unimodal.models.generation import GenerationSettings
from unimodal.schema import MODALITIES
from unimodal.models.attention import build_attention_mask
from unimodal.models.unified import UnifiedModel
from unimodal.modalities.vocab import SPAN_MARKERS
from unimodal.schema import MODALITY_IDS

TextCallback = Callable[[int, str], None]


class GenerationTimeout(RuntimeError):
    """A generation ran past ``GenerationSettings.timeout_s``."""


@dataclass(frozen=True)
class MediaMode:
    """A media modality the model can write, and how."""

    name: str
    kind: str  # "discrete" | "causal" | "bidirectional"
    begin: int
    end: int
    # fewest positions a whole span takes after its begin token, end token included
    min_positions: int


@dataclass
class Segment:
    """One ordered piece of a reply: text, or one media item as the model wrote it.

    ``data``: discrete codes (``[n]`` for a one-layer range, ``[layers, frames]`` for RVQ) or
    continuous features ``[slots, D]`` (float32, CPU). ``ids``: a text segment's token ids (up to
    where a stop string cut it).
    """

    type: str  # "text" | "image" | "audio"
    text: str = ""
    data: np.ndarray | None = None
    ids: list[int] = field(default_factory=list)


@dataclass
class Generation:
    segments: list[Segment]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    seed: int


@dataclass
class _Row:
    """Decoding state of one conditional row."""

    index: int
    budget: int
    mode: MediaMode | None = None
    text_ids: list[int] = field(default_factory=list)
    streamed: int = 0
    span: list[Any] = field(default_factory=list)
    remaining: int = 0
    forced: int | None = None
    block_pending: bool = False
    guided: bool = False
    segments: list[Segment] = field(default_factory=list)
    media: int = 0
    used: dict[str, int] = field(default_factory=dict)
    new: int = 0
    done: bool = False
    finish: str = "length"


class _Cache:
    """The batched KV cache with, per row, which cached positions are real and the next position id."""

    def __init__(self, model: UnifiedModel, docs: Sequence[EncodedDocument], pad_id: int):
        self.model = model
        self.decoder = model.backbone.get_decoder()
        self.embed_tokens = model.backbone.get_input_embeddings()
        self.device = self.embed_tokens.weight.device
        self.dtype = self.embed_tokens.weight.dtype
        self.pad_id = pad_id
        self.cache = DynamicCache()
        self._ones: torch.Tensor | None = None
        self.lengths = [len(d) for d in docs]
        embeds, real, blocks, modality = self._prompt_embeddings(docs)
        positions = (real.cumsum(1) - 1).clamp(min=0)
        mask = build_attention_mask(real.long(), blocks)
        out = self._run(embeds, mask, positions, modality)
        self.valid = real
        self.next_pos = real.sum(1)
        self.last = out[:, -1]
        # every cached position of every row is real: one-position steps need no explicit mask
        self.dense = bool(real.all())

    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    def _prompt_embeddings(self, docs: Sequence[EncodedDocument]) -> tuple[torch.Tensor, ...]:
        """Left-padded prompt embeddings (continuous slots take their modality's clean embedding),
        which positions are real, bidirectional block ids and modality ids."""
        rows, width = len(docs), max(self.lengths)
        arrays = {
            "input_ids": np.full((rows, width), self.pad_id, np.int64),
            "modality_ids": np.zeros((rows, width), np.int64),
            "block_ids": np.full((rows, width), -1, np.int64),
            "continuous_mask": np.zeros((rows, width), bool),
            "doc_ids": np.zeros((rows, width), np.int64),
        }
        for row, doc in enumerate(docs):
            cols = slice(width - len(doc), width)
            arrays["input_ids"][row, cols] = doc.ids
            arrays["modality_ids"][row, cols] = doc.modality
            arrays["block_ids"][row, cols] = doc.block
            arrays["continuous_mask"][row, cols] = doc.continuous
            arrays["doc_ids"][row, cols] = 1
        tensors = {k: torch.from_numpy(v).to(self.device) for k, v in arrays.items()}
        features = [d.features for d in docs if len(d.features)]
        batch = PackedBatch(
            features=torch.from_numpy(np.concatenate(features)).to(self.device) if features else torch.zeros(0, 0, device=self.device),
            position_ids=(tensors["doc_ids"].cumsum(1) - 1).clamp(min=0),
            labels=torch.full_like(tensors["input_ids"], IGNORE_INDEX),
            target_mask=torch.zeros_like(tensors["continuous_mask"]),
            **tensors,
        )
        embeds = self.embed_tokens(batch.input_ids)
        if batch.continuous_mask.any():
            slot_modality = batch.modality_ids[batch.continuous_mask]
            adapted = torch.zeros(len(slot_modality), embeds.shape[-1], dtype=embeds.dtype, device=self.device)
            for name, modality_id in MODALITY_IDS.items():
                rows_of = slot_modality == modality_id
                if not rows_of.any():
                    continue
                if name not in self.model.continuous:
                    raise ValueError(f"the prompt holds continuous {name} features but the model has no continuous {name} adapter")
                adapted[rows_of] = embed_features(self.model, name, batch.features[rows_of], batch, rows_of).to(embeds.dtype)
            embeds = embeds.masked_scatter(batch.continuous_mask[..., None], adapted)
        return embeds, batch.doc_ids > 0, batch.block_ids, batch.modality_ids

    def _run(self, embeds: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, modality: torch.Tensor | None) -> torch.Tensor:
        if self.model.routing is not None:  # modality experts (LlamaFusion) route each position
            self.model.routing.set(modality)
        out = self.decoder(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=self.cache, use_cache=True
        )
        return out.last_hidden_state

    def step(
        self,
        embeds: torch.Tensor,
        real: torch.Tensor | None,
        modality: torch.Tensor | None,
        bidirectional: bool = False,
        commit: bool = True,
    ) -> torch.Tensor:
        """Run ``embeds [R, q, H]`` (of modality ids ``modality [R, q]``, needed with modality
        experts) on top of the cache; ``real [R, q]`` marks positions that count (None: all).

        A real query sees the row's real cached positions and the chunk's real positions before it
        (all of them when ``bidirectional``); a hole sees only itself. Without ``commit`` the cache
        is cropped back afterwards, so the call leaves no trace.
        """
        rows, q = embeds.shape[:2]
        everything = real is None
        if everything:
            real = self._all_real(rows, q)
        if everything and self.dense and q == 1:
            mask = None  # the backbone's own causal mask over a cache without holes
        else:
            eye = torch.eye(q, dtype=torch.bool, device=self.device)
            inner = real[:, None, :] & real[:, :, None]
            if not bidirectional:
                inner = inner & torch.tril(torch.ones(q, q, dtype=torch.bool, device=self.device))
            prefix = self.valid[:, None, :] & real[:, :, None]
            mask = torch.cat([prefix.expand(rows, q, self.valid.shape[1]), inner | eye], dim=-1)[:, None]
        positions = self.next_pos[:, None] + (torch.arange(q, device=self.device) if everything else (real.cumsum(1) - 1).clamp(min=0))
        hidden = self._run(embeds.to(self.dtype), mask, positions, modality)
        if not commit:
            self.cache.crop(-q)
            return hidden
        self.valid = torch.cat([self.valid, real], dim=1)
        if everything:
            self.next_pos = self.next_pos + q
            self.last = hidden[:, -1].to(self.last.dtype)
            return hidden
        self.dense = False
        self.next_pos = self.next_pos + real.sum(1)
        last_real = (real.cumsum(1) == real.sum(1, keepdim=True)) & real
        picked = (hidden * last_real[..., None]).sum(1)
        self.last = torch.where(real.any(1)[:, None], picked.to(self.last.dtype), self.last)
        return hidden

    def _all_real(self, rows: int, q: int) -> torch.Tensor:
        if self._ones is None or self._ones.shape != (rows, q):
            self._ones = torch.ones(rows, q, dtype=torch.bool, device=self.device)
        return self._ones

    def step_rows(self, rows: list[int], embeds: torch.Tensor, modality: str, bidirectional: bool, commit: bool) -> torch.Tensor:
        """``step`` where only ``rows`` take part, with ``embeds [len(rows), q, H]`` of one modality;
        their hidden states."""
        q = embeds.shape[1]
        full = torch.zeros(self.rows, q, embeds.shape[-1], dtype=self.dtype, device=self.device)
        real = torch.zeros(self.rows, q, dtype=torch.bool, device=self.device)
        index = torch.tensor(rows, device=self.device)
        full[index] = embeds.to(self.dtype)
        real[index] = True
        ids = torch.where(real, MODALITY_IDS[modality], MODALITY_IDS["text"])
        return self.step(full, real, ids, bidirectional, commit)[index]

    def forget_since(self, row: int, column: int, position: int) -> None:
        """Make row ``row``'s cached positions from ``column`` on invisible; restart its positions at ``position``."""
        self.valid[row, column:] = False
        self.next_pos[row] = position
        self.dense = False

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search)."""
        self.cache.reorder_cache(index)
        self.valid = self.valid[index]
        self.next_pos = self.next_pos[index]
        self.last = self.last[index]


def embed_features(model: UnifiedModel, name: str, features: torch.Tensor, batch: PackedBatch | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Clean (noise-free) input embeddings of continuous features: the modality's ``embed_clean``,
    or, for understanding-only adapters without one, its training ``embed``."""
    modality = model.continuous[name]
    features = features.to(_dtype(modality))
    embed_clean = getattr(modality, "embed_clean", None)
    if embed_clean is not None:
        return embed_clean(features)
    if batch is None:
        raise ValueError(f"the continuous {name} modality has no embed_clean, so the engine cannot feed it generated features")
    return modality.embed(features, batch, rows, model)[0]


def _dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a modality's own weights compute in (a bf16 backbone may feed an fp32 head)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def media_modes(model: UnifiedModel, spans: dict[str, SpanSpec]) -> dict[int, MediaMode]:
    """The modalities ``model`` can write, keyed by their begin-token id."""
    layout, modes = model.layout, {}
    for name, (begin, end) in SPAN_MARKERS.items():
        if begin not in layout.specials or end not in layout.specials:
            continue
        ids = layout.special_id(begin), layout.special_id(end)
        if name in spans and name in layout.code_ranges:
            spec = spans[name]
            modes[ids[0]] = MediaMode(name, "discrete", *ids, spec.layers * (spec.length or spec.min_length) + 1)
        elif name in model.continuous:
            modality = model.continuous[name]
            kind = getattr(modality, "attention", None)
            writes = {"causal": "sample_next", "bidirectional": "denoise_block"}.get(kind)
            if writes and callable(getattr(modality, writes, None)):
                modes[ids[0]] = MediaMode(name, kind, *ids, int(modality.slots_per_item) + 1)
    return modes


class Engine:
    """Generates replies for batches of encoded prompts with one model.

    ``spans`` gives the shape of each discrete modality's spans (see ``constraints.SpanSpec``);
    ``stop_ids`` are token ids that end a reply besides the tokenizer's end-of-sequence;
    ``max_length`` is the context length (prompt plus reply), by default the backbone's
    ``max_position_embeddings``.
    """

    def __init__(
        self,
        model: UnifiedModel,
        tokenizer: Any,
        spans: dict[str, SpanSpec | dict[str, Any]] | None = None,
        stop_ids: Sequence[int] = (),
        max_length: int | None = None,
    ):
        self.model = model.eval()
        self.layout = model.layout
        self.tokenizer = tokenizer
        self.spans = {name: s if isinstance(s, SpanSpec) else SpanSpec(**s) for name, s in (spans or {}).items()}
        self.constraint = MediaSpanConstraint(self.layout, self.spans) if self.layout.code_ranges else None
        self.modes = media_modes(model, self.spans)
        self.stop_ids = {tokenizer.eos_id, *stop_ids}
        self.pad_id = tokenizer.pad_id
        self.max_length = max_length or int(getattr(model.backbone.config, "max_position_embeddings", 2048))
        self.device = model.backbone.get_input_embeddings().weight.device
        self.continuous_begins = [begin for begin, mode in self.modes.items() if mode.kind != "discrete"]
        # in text mode no special token may be written except the begin token of a writable modality
        self.text_ban = torch.zeros(self.layout.size, dtype=torch.bool, device=self.device)
        for special in self.layout.specials:
            self.text_ban[self.layout.special_id(special)] = True
        for begin in self.modes:
            self.text_ban[begin] = False

    # ----------------------------------------------------------------------------------------
    # public entry point

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[EncodedDocument],
        settings: GenerationSettings | None = None,
        unconditional: EncodedDocument | None = None,
        on_text: TextCallback | None = None,
    ) -> list[Generation]:
        """Replies to ``prompts`` (each ending where the reply starts).

        ``unconditional`` is the prompt of the guidance rows (needed when a writable modality has
        ``cfg_scale != 1``). ``on_text(row, new_text)`` receives text as it is decoded.
        """
        settings = settings or GenerationSettings()
        if not prompts:
            return []
        budgets = [self._budget(len(p), settings) for p in prompts]
        generator, seed = make_generator(settings.seed, self.device)
        deadline = time.monotonic() + settings.timeout_s if settings.timeout_s else None
        if settings.text.num_beams > 1:
            if any(len(p) and int(p.ids[-1]) in self.modes for p in prompts):
                raise ValueError("beam search writes text only; a reply that starts with media needs num_beams=1")
            return self._beam_search(prompts, budgets, settings, seed, deadline)
        guided = {m.name for m in self.modes.values() if settings.for_modality(m.name).cfg_scale != 1}
        if guided and unconditional is None:
            raise ValueError(f"classifier-free guidance for {sorted(guided)} needs an unconditional prompt")
        if guided and len(unconditional) and int(unconditional.ids[-1]) in self.modes:
            raise ValueError("the unconditional prompt must end before any begin token; the engine adds it when a span opens")
        docs = list(prompts) + ([unconditional] * len(prompts) if guided else [])
        run = _Run(self, _Cache(self.model, docs, self.pad_id), prompts, budgets, settings, generator, guided, deadline, on_text)
        run.loop()
        return [
            Generation(row.segments, row.finish, len(p), row.new, seed) for row, p in zip(run.rows, prompts)
        ]

    def _budget(self, prompt_length: int, settings: GenerationSettings) -> int:
        room = self.max_length - prompt_length
        if room < 1:
            raise ValueError(f"the prompt has {prompt_length} tokens and fills the context of {self.max_length}")
        return min(settings.max_new_tokens, room)

    # ----------------------------------------------------------------------------------------
    # pieces shared by sampling and beam search

    def constrain(self, scores: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, in_text: list[int]) -> torch.Tensor:
        """Apply the span grammar (codes only inside spans, spans well formed) given each row's history.

        The grammar forbids the begin token of a code range without a span spec; a continuous
        modality whose input mixes code-range rows (Orthus' soft VQ) still opens its spans from
        text (rows ``in_text``).
        """
        if self.constraint is None:
            return scores
        constrained = self.constraint(torch.where(valid, ids, self.pad_id), scores)
        if self.continuous_begins and in_text:
            rows = torch.tensor(in_text, device=scores.device)[:, None]
            constrained[rows, self.continuous_begins] = scores[rows, self.continuous_begins]
        return constrained

    def text_segment(self, ids: list[int], stop: Sequence[str]) -> tuple[str, bool]:
        """Decoded text cut at the first stop string, and whether one was found."""
        text = self.tokenizer.decode(ids)
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def _beam_search(
        self,
        prompts: Sequence[EncodedDocument],
        budgets: list[int],
        settings: GenerationSettings,
        seed: int,
        deadline: float | None,
    ) -> list[Generation]:
        """Text-only beam search (media begin tokens are forbidden), scored like transformers'
        ``generate(num_beams=K)``: summed log-probabilities over length ** 1, stopping once K
        hypotheses are finished and no running beam can beat the worst of them."""
        k, batch = settings.text.num_beams, len(prompts)
        cache = _Cache(self.model, prompts, self.pad_id)
        cache.reorder(torch.arange(batch, device=self.device).repeat_interleave(k))
        ids, valid = _padded_ids(prompts, self.pad_id, self.device)
        ids, valid = ids.repeat_interleave(k, 0), valid.repeat_interleave(k, 0)
        ban = self.text_ban.clone()
        ban[list(self.modes)] = True
        beam_scores = torch.zeros(batch, k, device=self.device)
        beam_scores[:, 1:] = -1e9
        tokens: list[list[int]] = [[] for _ in range(batch * k)]
        finished: list[list[tuple[float, list[int], bool]]] = [[] for _ in range(batch)]
        done = [False] * batch
        step = 0
        while not all(done):
            _check_deadline(deadline)
            # the order of transformers' beam search: log-softmax, repetition penalty, other processors
            logprobs = self.model.logits(cache.last).log_softmax(-1)
            logprobs = apply_repetition_penalty(logprobs, ids, valid, settings.text.repetition_penalty)
            logprobs = self.constrain(logprobs, ids, valid, []).masked_fill(ban, float("-inf"))
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
                    ends = token in self.stop_ids
                    if ends or last_step:
                        if rank < k:
                            _add_hypothesis(finished[b], k, score / (step + 1), tokens[source] + ([] if ends else [token]), ends)
                        continue
                    chosen.append((source, token, score))
                    if len(chosen) == k:
                        break
                while len(chosen) < k:  # a finished item keeps feeding placeholders
                    chosen.append((b * k, self.pad_id, -1e9))
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
            index = torch.tensor(sources, device=self.device)
            cache.reorder(index)
            ids, valid = ids[index], valid[index]
            tokens = [tokens[s] + [t] for s, t in zip(sources, next_tokens)]
            beam_scores = torch.tensor(next_scores, device=self.device).view(batch, k)
            new = torch.tensor(next_tokens, device=self.device)[:, None]
            live = torch.tensor([not done[i // k] for i in range(batch * k)], device=self.device)[:, None]
            ids, valid = torch.cat([ids, new], 1), torch.cat([valid, live], 1)
            cache.step(cache.embed_tokens(new), None if all(not d for d in done) else live, torch.zeros_like(new))
        out = []
        for b, prompt in enumerate(prompts):
            _, best, ended = max(finished[b], key=lambda h: h[0])
            text, stopped = self.text_segment(best, settings.stop)
            segments = [Segment("text", text, ids=best)] if text else []
            out.append(Generation(segments, "stop" if ended or stopped else "length", len(prompt), len(best) + int(ended), seed))
        return out


def _add_hypothesis(pool: list[tuple[float, list[int], bool]], k: int, score: float, tokens: list[int], ended: bool) -> None:
    if len(pool) < k:
        pool.append((score, tokens, ended))
    elif score > min(h[0] for h in pool):
        pool.remove(min(pool, key=lambda h: h[0]))
        pool.append((score, tokens, ended))


def _padded_ids(prompts: Sequence[EncodedDocument], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.from_numpy(np.asarray(prompt.ids, dtype=np.int64))
        valid[row, width - len(prompt) :] = True
    return ids.to(device), valid.to(device)


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise GenerationTimeout("generation ran past its time limit")


class _Run:
    """One sampling generation: the per-row state machine driving the shared cache."""

    def __init__(
        self,
        engine: Engine,
        cache: _Cache,
        prompts: Sequence[EncodedDocument],
        budgets: list[int],
        settings: GenerationSettings,
        generator: torch.Generator,
        guided: set[str],
        deadline: float | None,
        on_text: TextCallback | None,
    ):
        self.engine, self.cache, self.settings = engine, cache, settings
        self.generator, self.guided, self.deadline, self.on_text = generator, guided, deadline, on_text
        self.model = engine.model
        self.batch = len(prompts)
        self.rows = [_Row(i, budget) for i, budget in enumerate(budgets)]
        # the token history is kept only when the span grammar or a repetition penalty reads it
        self.track_ids = engine.constraint is not None or any(settings.for_modality(m).repetition_penalty != 1 for m in MODALITIES)
        self.ids, self.valid = _padded_ids(prompts, engine.pad_id, engine.device) if self.track_ids else (None, None)
        # where each guidance row's current span starts (cache column) and its prompt's length
        self.partner_start: dict[int, int] = {}
        # modality id of the position each row feeds next (routes it to its modality's experts)
        self.modality_of: dict[int, int] = {}
        self.unconditional_length = cache.lengths[-1] if guided else 0
        self._open_prompt_spans(prompts)

    def _open_prompt_spans(self, prompts: Sequence[EncodedDocument]) -> None:
        """A prompt that ends with a begin token (``... an image of a cat: <|boi|>``) starts its
        reply inside that span; its guidance partner is given the begin token too."""
        partners = []
        for row, prompt in zip(self.rows, prompts):
            mode = self.engine.modes.get(int(prompt.ids[-1])) if len(prompt) else None
            if mode is None:
                continue
            self._enter(row, mode, int(prompt.ids[-1]))
            if row.guided:
                partners.append(row)
        if partners:
            for row in partners:
                self.partner_start[row.index] = self.cache.valid.shape[1]
            for name in {r.mode.name for r in partners}:
                group = [r for r in partners if r.mode.name == name]
                begins = torch.tensor([[r.mode.begin] for r in group], device=self.cache.device)
                self.cache.step_rows([self.batch + r.index for r in group], self.cache.embed_tokens(begins), name, False, True)

    # -- the loop ---------------------------------------------------------------------------

    def loop(self) -> None:
        while True:
            active = [r for r in self.rows if not r.done]
            if not active:
                return
            _check_deadline(self.deadline)
            pending = [r for r in active if r.block_pending]
            if pending:
                self._denoise_blocks(pending)
            feed = self._choose(active)
            if all(r.done for r in self.rows):
                return
            self._feed(feed)

    def _choose(self, active: list[_Row]) -> dict[int, Any]:
        """Decide each active row's next input: a token id or a continuous embedding ``[H]``."""
        feed: dict[int, Any] = {}
        sampled = [r for r in active if r.forced is None and (r.mode is None or r.mode.kind == "discrete")]
        drawn = [r for r in active if r.mode is not None and r.mode.kind == "causal" and r.remaining > 0]
        for row in active:
            if row.forced is not None:
                self._advance(row, row.forced, feed)
        if sampled:
            tokens = self._sample_tokens(sampled)
            for row, token in zip(sampled, tokens):
                self._advance(row, token, feed)
        if drawn:
            self._draw_features(drawn, feed)
        return feed

    def _feed(self, feed: dict[int, Any]) -> None:
        """One cache step: every row with an input (and its guidance partner in a guided span)."""
        cache, pad = self.cache, self.engine.pad_id
        token_ids, modality = [pad] * cache.rows, [0] * cache.rows
        real = [False] * cache.rows
        vectors: dict[int, torch.Tensor] = {}
        for index, value in feed.items():
            for target in [index] + ([self.batch + index] if self.rows[index].guided else []):
                real[target], modality[target] = True, self.modality_of[index]
                if isinstance(value, int):
                    token_ids[target] = value
                else:
                    vectors[target] = value
        embeds = cache.embed_tokens(torch.tensor(token_ids, device=cache.device))
        if vectors:
            index = torch.tensor(list(vectors), device=cache.device)
            embeds = embeds.index_put((index,), torch.stack(list(vectors.values())).to(embeds.dtype))
        if self.track_ids:  # token history of conditional rows (span grammar, repetition penalty)
            media = self.engine.layout.special_id("<|media|>")
            new_ids = [feed.get(i, pad) if isinstance(feed.get(i, pad), int) else media for i in range(self.batch)]
            self.ids = torch.cat([self.ids, torch.tensor(new_ids, device=cache.device)[:, None]], 1)
            self.valid = torch.cat([self.valid, torch.tensor(real[: self.batch], device=cache.device)[:, None]], 1)
        mask = None if all(real) else torch.tensor(real, device=cache.device)[:, None]
        routed = self.model.routing is not None  # modality ids are only read by modality experts
        cache.step(embeds[:, None], mask, torch.tensor(modality, device=cache.device)[:, None] if routed else None)

    # -- sampling ---------------------------------------------------------------------------

    def _sample_tokens(self, rows: list[_Row]) -> list[int]:
        engine, cache = self.engine, self.cache
        index = [r.index for r in rows]
        guided = [i for i, r in enumerate(rows) if r.guided]
        everyone = len(rows) == cache.rows  # every row, in order, and no guidance rows
        hidden = cache.last if everyone else cache.last[index + [self.batch + rows[i].index for i in guided]]
        logits = self.model.logits(hidden)
        scores = logits[: len(rows)]
        if guided:
            scale = torch.tensor([self._settings(rows[i]).cfg_scale for i in guided], device=scores.device)[:, None]
            cond, uncond = scores[guided], logits[len(rows) :]
            mixed = uncond + scale * (cond - uncond)
            scores = scores.clone()
            scores[guided] = torch.where(torch.isfinite(cond), mixed, cond)
        ids = valid = None
        if self.track_ids:
            ids, valid = (self.ids, self.valid) if len(rows) == self.batch else (self.ids[index], self.valid[index])
        text_rows = [i for i, r in enumerate(rows) if r.mode is None]
        scores = self._ban(engine.constrain(scores, ids, valid, text_rows), rows, text_rows)
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.mode.name if row.mode else "text", []).append(i)
        if len(groups) == 1:
            settings = self.settings.for_modality(next(iter(groups)))
            if settings.repetition_penalty != 1.0:
                scores = apply_repetition_penalty(scores, ids, valid, settings.repetition_penalty)
            return choose(scores, settings, self.generator).tolist()
        chosen = torch.empty(len(rows), dtype=torch.long, device=scores.device)
        for name, members in groups.items():
            settings, group = self.settings.for_modality(name), scores[members]
            if settings.repetition_penalty != 1.0:
                group = apply_repetition_penalty(group, ids[members], valid[members], settings.repetition_penalty)
            chosen[members] = choose(group, settings, self.generator)
        return chosen.tolist()

    def _ban(self, scores: torch.Tensor, rows: list[_Row], text_rows: list[int]) -> torch.Tensor:
        """In text mode: no special token but the begin tokens of modalities a row may still open
        (media limit, reply budget, the modality's own cap)."""
        if not text_rows:
            return scores
        ban = self.engine.text_ban
        if len(text_rows) == len(rows):
            scores = scores.masked_fill(ban, float("-inf"))
        else:
            scores = scores.clone()
            scores[text_rows] = scores[text_rows].masked_fill(ban, float("-inf"))
        closed = [(i, begin) for i in text_rows for begin, mode in self.engine.modes.items() if not self._may_open(rows[i], mode)]
        if closed:
            at_row, at_token = zip(*closed)
            scores[list(at_row), list(at_token)] = float("-inf")
        return scores

    def _may_open(self, row: _Row, mode: MediaMode) -> bool:
        cap = self.settings.for_modality(mode.name).max_tokens
        fits = row.new + 1 + mode.min_positions <= row.budget
        under_cap = cap is None or row.used.get(mode.name, 0) + 1 + mode.min_positions <= cap
        return row.media < self.settings.max_media and fits and under_cap

    def _draw_features(self, rows: list[_Row], feed: dict[int, Any]) -> None:
        """Causal continuous spans: the head samples each row's next feature from its last hidden state."""
        for name, members in _by_mode(rows).items():
            modality, settings = self.model.continuous[name], self.settings.for_modality(name)
            guided = name in self.guided
            index = [r.index for r in members]
            hidden = self.cache.last[index + ([self.batch + i for i in index] if guided else [])].to(_dtype(modality))
            features = modality.sample_next(
                hidden, cfg_scale=settings.cfg_scale if guided else 1.0, steps=settings.steps, generator=self.generator
            )
            embeds = embed_features(self.model, name, features)
            for k, row in enumerate(members):
                row.span.append(features[k].float().cpu())
                row.remaining -= 1
                if row.remaining == 0:
                    self._close_span(row, torch.stack(row.span).numpy())
                    row.forced = row.mode.end
                self._count(row, embeds[k], feed, name)

    def _denoise_blocks(self, rows: list[_Row]) -> None:
        """Bidirectional continuous spans: denoise whole items, then commit one clean pass."""
        for name, members in _by_mode(rows).items():
            modality, settings = self.model.continuous[name], self.settings.for_modality(name)
            guided = name in self.guided
            cond = [r.index for r in members]
            both = cond + ([self.batch + i for i in cond] if guided else [])

            def run_backbone(embeds: torch.Tensor) -> torch.Tensor:
                if embeds.shape[0] not in (len(cond), len(both)):
                    raise ValueError(f"run_backbone got {embeds.shape[0]} rows; expected {len(cond)} (or {len(both)} with guidance)")
                chosen = cond if embeds.shape[0] == len(cond) else both
                return self.cache.step_rows(chosen, embeds, name, bidirectional=True, commit=False).to(_dtype(modality))

            features = modality.denoise_block(
                run_backbone,
                len(cond),
                cfg_scale=settings.cfg_scale if guided else 1.0,
                steps=settings.steps,
                generator=self.generator,
            )
            n, slots, dim = features.shape
            clean = embed_features(self.model, name, features.reshape(n * slots, dim)).reshape(n, slots, -1)
            self.cache.step_rows(both, clean.repeat(len(both) // n, 1, 1), name, bidirectional=True, commit=True)
            if self.track_ids:
                media_id = self.engine.layout.special_id("<|media|>")
                self.ids = torch.cat([self.ids, torch.full((self.batch, slots), media_id, device=self.ids.device)], 1)
                grown = torch.zeros(self.batch, slots, dtype=torch.bool, device=self.valid.device)
                grown[cond] = True
                self.valid = torch.cat([self.valid, grown], 1)
            for k, row in enumerate(members):
                row.block_pending = False
                row.new += slots
                row.used[name] = row.used.get(name, 0) + slots
                self._close_span(row, features[k].float().cpu().numpy())
                row.forced = row.mode.end

    # -- the state machine ------------------------------------------------------------------

    def _settings(self, row: _Row):
        return self.settings.for_modality(row.mode.name if row.mode else "text")

    def _advance(self, row: _Row, token: int, feed: dict[int, Any]) -> None:
        """Apply one chosen token to ``row``'s state; queue it for feeding unless the row ended."""
        engine = self.engine
        if row.forced is not None:  # the end token after a continuous span
            name, row.forced = row.mode.name, None
            self._leave_span(row)
            self._count(row, token, feed, name)
            return
        if row.mode is not None:  # discrete span
            name = row.mode.name
            row.span.append(token)
            if token == row.mode.end:
                self._close_span(row, self._codes(row))
                self._leave_span(row)
            self._count(row, token, feed, name)
            return
        if token in engine.stop_ids:
            self._finish(row, "stop")
            return
        mode = engine.modes.get(token)
        if mode is None:
            row.text_ids.append(token)
            self._count(row, token, feed, "text")
            cap = self.settings.text.max_tokens
            if not row.done and cap is not None and row.used["text"] >= cap:
                self._finish(row, "length")
            elif not row.done:
                self._stream(row)
            return
        self._flush_text(row)
        self._count(row, token, feed, mode.name)
        if not row.done:
            self._enter(row, mode, token)
            if row.guided:
                self.partner_start[row.index] = self.cache.valid.shape[1]

    def _enter(self, row: _Row, mode: MediaMode, begin: int) -> None:
        row.mode, row.span, row.media = mode, [begin] if mode.kind == "discrete" else [], row.media + 1
        row.guided = mode.name in self.guided
        row.remaining = mode.min_positions - 1 if mode.kind == "causal" else 0
        row.block_pending = mode.kind == "bidirectional"

    def _count(self, row: _Row, value: Any, feed: dict[int, Any], name: str) -> None:
        """One position written: queue it, charge it to the budgets, end the row when they run out."""
        feed[row.index] = value
        self.modality_of[row.index] = MODALITY_IDS[name]
        row.new += 1
        row.used[name] = row.used.get(name, 0) + 1
        if row.new >= row.budget:
            self._finish(row, "length")

    def _codes(self, row: _Row) -> np.ndarray:
        span = extract_spans(row.span, self.engine.layout, {row.mode.name: self.engine.spans[row.mode.name]})[0]
        return span.codes[0] if span.codes.shape[0] == 1 else span.codes

    def _close_span(self, row: _Row, data: np.ndarray) -> None:
        row.segments.append(Segment(row.mode.name, data=data))

    def _leave_span(self, row: _Row) -> None:
        if row.guided:
            partner = self.batch + row.index
            self.cache.forget_since(partner, self.partner_start.pop(row.index), self.unconditional_length)
            row.guided = False
        row.mode, row.span = None, []

    def _stream(self, row: _Row) -> None:
        """Check stop strings and pass newly decoded text to the callback (held back while it may
        still become a stop string or is an incomplete character)."""
        stop = self.settings.stop
        if not stop and self.on_text is None:
            return
        text, stopped = self.engine.text_segment(row.text_ids, stop)
        if stopped:
            self._finish(row, "stop")
            return
        if self.on_text is None:
            return
        hold = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        ready = text[: len(text) - hold].rstrip("\ufffd")
        if len(ready) > row.streamed:
            self.on_text(row.index, ready[row.streamed :])
            row.streamed = len(ready)

    def _flush_text(self, row: _Row) -> None:
        if not row.text_ids:
            return
        text, _ = self.engine.text_segment(row.text_ids, self.settings.stop)
        if self.on_text is not None and len(text) > row.streamed:
            self.on_text(row.index, text[row.streamed :])
        if text:
            row.segments.append(Segment("text", text, ids=row.text_ids))
        row.text_ids, row.streamed = [], 0

    def _finish(self, row: _Row, reason: str) -> None:
        if row.done:
            return
        row.done, row.finish = True, reason
        if row.mode is not None:  # an unfinished span is dropped
            row.mode, row.span, row.block_pending, row.forced = None, [], False, None
        self._flush_text(row)


def open_span(doc: EncodedDocument, layout: Any, begin: str) -> EncodedDocument:
    """``doc`` followed by the begin token ``begin`` (``"<|boi|>"``): a prompt whose reply starts
    inside that media span, e.g. text-to-image."""
    modality = next((name for name, (b, _) in SPAN_MARKERS.items() if b == begin), None)
    if modality is None:
        raise ValueError(f"{begin!r} is not a begin token; known: {[b for b, _ in SPAN_MARKERS.values()]}")
    return EncodedDocument(
        ids=np.append(doc.ids, layout.special_id(begin)),
        modality=np.append(doc.modality, MODALITY_IDS[modality]).astype(doc.modality.dtype),
        target=np.append(doc.target, False),
        block=np.append(doc.block, -1).astype(doc.block.dtype),
        continuous=np.append(doc.continuous, False),
        features=doc.features,
        key=doc.key,
    )


def _by_mode(rows: list[_Row]) -> dict[str, list[_Row]]:
    """Rows grouped by their current media mode, so each modality runs once per step."""
    groups: dict[str, list[_Row]] = {}
    for row in rows:
        groups.setdefault(row.mode.name, []).append(row)
    return groups
