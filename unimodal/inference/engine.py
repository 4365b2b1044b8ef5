"""The one generation engine: a state machine over modes on a batched KV cache.

Every row of a batch is in one mode at a time:

- **text**: the LM head samples with the text settings; a begin token (``<|boi|>``, ``<|boa|>``)
  of a modality the model can write switches mode, every other special token is forbidden;
- **discrete span** (MIO, SEED): codes are sampled under :class:`MediaSpanConstraint`, which
  allows exactly the codes a well-formed span needs and then its end token;
- **causal continuous span** (Orthus): the modality's head samples the next feature from the
  last hidden state (``sample_next``), its clean embedding is committed to the cache, and after
  ``slots_per_item`` features the end token is forced. Given a head worker (a server on a CPU,
  ``unimodal.inference.head_worker``), the head samples in that process while the other rows
  step, and the row sits those steps out;
- **bidirectional continuous span** (Transfusion, LlamaFusion): the modality denoises a whole
  image (``denoise_block``), calling back into the backbone for the image's slots on top of the
  cached prefix; the cache is cropped back after each call and one clean pass is committed.

All rows share one batched KV cache (``unimodal.inference.cache``) in which left padding, finished
rows and rows that sit out another row's step are holes no query attends. Classifier-free guidance
gives a row in a guided span a partner (a copy of the unconditional prompt's row, in the same
batched cache) that follows it through the span and leaves the cache with it: every cache row is
computed at every step, so rows that write no guided media cost no second row. Beam search
(``num_beams > 1``) decodes text with a loop of its own (``unimodal.inference.beam``). ``Generation`` holds raw outputs
(text, codes, features); turning media arrays into pictures and waveforms is the codecs' job
(``unimodal.inference.chat``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from unimodal.data.processor import EncodedDocument
from unimodal.data.tokenizer import TextTokenizer
from unimodal.inference.beam import beam_search
from unimodal.inference.cache import KVCache, compute_dtype, embed_features, padded_ids
from unimodal.inference.constraints import OUTSIDE, MediaSpanConstraint, SpanSpec, extract_spans
from unimodal.inference.head_worker import Call, HeadWorker, HeadWorkerError
from unimodal.inference.modes import MediaMode, media_modes
from unimodal.inference.outputs import Deadline, Generation, Segment, expired_error, expiry
from unimodal.inference.sampling import apply_repetition_penalty, choose, make_generator
from unimodal.models.generation import GenerationSettings, SamplingSettings
from unimodal.models.unified import UnifiedModel
from unimodal.schema import MODALITIES, MODALITY_IDS

TextCallback = Callable[[int, str], None]
DoneCallback = Callable[[int, Generation], None]
MediaCallback = Callable[[int, Segment], None]

log = logging.getLogger("unimodal.generate")


@dataclass
class _Row:
    """Decoding state of one conditional row, with the settings, seed and deadline of its request."""

    index: int
    budget: int
    settings: GenerationSettings
    generator: torch.Generator
    seed: int
    prompt_tokens: int
    deadline: Deadline
    slot: int = -1  # its row in the cache (rows move up as finished ones leave it)
    guides: bool = False  # its settings guide some modality: it may need a guidance partner
    partner: int = -1  # the cache row of its guidance partner while it is in a guided span, else -1
    mode: MediaMode | None = None
    text_ids: list[int] = field(default_factory=list)
    streamed: int = 0
    span: list[Any] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # codes of each layer in its open discrete span
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

    def generation(self) -> Generation:
        """What the row wrote, once it has ended."""
        return Generation(self.segments, self.finish, self.prompt_tokens, self.new, self.seed)


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
        tokenizer: TextTokenizer,
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
        # draws causal head slots beside the other rows' steps (a server on a CPU sets it)
        self.head_worker: HeadWorker | None = None
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
        settings: GenerationSettings | Sequence[GenerationSettings] | None = None,
        unconditional: EncodedDocument | None = None,
        on_text: TextCallback | None = None,
        cancel: threading.Event | Sequence[threading.Event | None] | None = None,
        on_done: DoneCallback | None = None,
        on_media: MediaCallback | None = None,
    ) -> list[Generation]:
        """Replies to ``prompts`` (each ending where the reply starts).

        ``settings`` is one for every row or one per row (a server batching requests): each row
        samples with its own settings, seed and ``timeout_s``, so a seeded row writes the same
        reply alone as in any batch. One shared seed ``s`` gives row ``i`` the seed ``s + i``.
        ``unconditional`` is the prompt of the guidance rows (needed when a row guides a writable
        modality, ``cfg_scale != 1``). ``on_text(row, new_text)`` receives text as it is decoded
        (beam search, whose beams are reranked to the end, passes each reply's text whole when it
        ends), ``on_media(row, segment)`` each media item as soon as its span closes (after the
        text before it), and ``on_done(row, generation)`` each row's generation as soon as the row
        ends, while the others go on (a server answers a short request before the batch's longest
        reply ends).
        ``cancel`` (shared or per row) stops a row at its next step.

        A row past its deadline or cancelled leaves the batch with ``finish_reason`` "timeout" or
        "cancelled" and the others go on; when no row is left to answer,
        :class:`GenerationTimeout` is raised.
        """
        if not prompts:
            return []
        settings = settings or GenerationSettings()
        rows = row_settings(settings, len(prompts)) if isinstance(settings, GenerationSettings) else list(settings)
        cancels = list(cancel) if isinstance(cancel, Sequence) else [cancel] * len(prompts)
        if len(rows) != len(prompts) or len(cancels) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts need as many settings and cancel events, got {len(rows)} and {len(cancels)}")
        budgets = [self.budget(p, s) for p, s in zip(prompts, rows)]
        seeded = [make_generator(s.seed, self.device) for s in rows]
        now = time.monotonic()
        deadlines = [Deadline(now + s.timeout_s if s.timeout_s else None, c) for s, c in zip(rows, cancels)]
        if rows[0].text.num_beams > 1:
            if any(s.replace(seed=rows[0].seed) != rows[0] for s in rows[1:]):
                raise ValueError("beam search runs rows with the same settings only")
            generations = beam_search(self, prompts, budgets, rows[0], [seed for _, seed in seeded], deadlines)
            for index, generation in enumerate(generations):
                text = "".join(segment.text for segment in generation.segments)
                if on_text is not None and text:  # beams are ranked to the end: the text comes whole
                    on_text(index, text)
                if on_done is not None:
                    on_done(index, generation)
            return generations
        if any(s.text.num_beams > 1 for s in rows):
            raise ValueError("beam search (num_beams > 1) cannot share a batch with sampled rows")
        guiding = [i for i, s in enumerate(rows) if any(s.for_modality(m.name).cfg_scale != 1 for m in self.modes.values())]
        if guiding and unconditional is None:
            names = sorted({m.name for s in rows for m in self.modes.values() if s.for_modality(m.name).cfg_scale != 1})
            raise ValueError(f"classifier-free guidance for {names} needs an unconditional prompt")
        if guiding and len(unconditional) and int(unconditional.ids[-1]) in self.modes:
            raise ValueError("the unconditional prompt must end before any begin token; the engine adds it when a span opens")
        reasons = [expiry(d) for d in deadlines]
        if all(reasons):
            raise expired_error(reasons)
        states = [_Row(i, budget, s, g, seed, len(p), d)
                  for i, (budget, s, (g, seed), d, p) in enumerate(zip(budgets, rows, seeded, deadlines, prompts))]
        for i in guiding:
            states[i].guides = True
        docs = list(prompts) + [unconditional] * bool(guiding)  # one template row; partners are copied from it
        run = _Run(self, KVCache(self.model, docs, self.pad_id), prompts, states, on_text, on_done, on_media)
        run.loop()
        if all(row.finish in EXPIRED for row in run.rows):
            raise expired_error([row.finish for row in run.rows])
        return [row.generation() for row in run.rows]

    def budget(self, prompt: EncodedDocument, settings: GenerationSettings) -> int:
        """How many positions a reply to ``prompt`` may write; ValueError when it can write none, or
        when the prompt opens a medium (``start_with``) that the settings leave no room for or that
        beam search (text only) cannot write. Callers
        that batch requests check each prompt here first, so that one bad request fails alone."""
        room = self.max_length - len(prompt)
        if room < 1:
            raise ValueError(f"the prompt has {len(prompt)} tokens and fills the context of {self.max_length}")
        budget = min(settings.max_new_tokens, room)
        mode = self.modes.get(int(prompt.ids[-1])) if len(prompt) else None
        if mode is not None and settings.text.num_beams > 1:
            raise ValueError(f"beam search writes text only; a reply that starts with {mode.name} needs num_beams=1")
        if mode is not None and not may_open(mode, settings, budget, begun=True):
            raise ValueError(
                f"the reply must start with {mode.name}, which its settings leave no room for (max_media={settings.max_media}, "
                f"{mode.name} max_tokens={settings.for_modality(mode.name).max_tokens}, max_new_tokens={settings.max_new_tokens}; "
                f"the rest of {'an' if mode.name[0] in 'aeiou' else 'a'} {mode.name} span takes at least {mode.min_positions} positions)"
            )
        return budget

    def read_worker(self, everything: bool = False) -> bool:
        """Take in the head worker's answers that have come (``everything``: wait for every call
        sent); False when there is no worker, or it was lost now."""
        if self.head_worker is None:
            return False
        try:
            if everything:
                self.head_worker.wait_all()
            else:
                self.head_worker.poll()
        except HeadWorkerError as err:
            self.lose_worker(err)
            return False
        return True

    def lose_worker(self, err: HeadWorkerError) -> None:
        """Go on without the head worker (once, with one warning): its unanswered calls fail, and
        their callers do the work in this process."""
        if self.head_worker is not None:
            log.warning("%s; drawing in this process from now on", err)
            self.close_worker()

    def close_worker(self) -> None:
        """End the head worker's process, if there is one; the engine then works in this process."""
        worker, self.head_worker = self.head_worker, None
        if worker is not None:
            worker.close()

    # ----------------------------------------------------------------------------------------
    # pieces shared by sampling and beam search

    def constrain(self, scores: torch.Tensor, states: Sequence[tuple], in_text: list[int]) -> torch.Tensor:
        """Apply the span grammar (codes only inside spans, spans well formed) given each row's
        grammar state (``constraints.OUTSIDE`` in text, else :meth:`MediaSpanConstraint.counted_state`).

        The grammar forbids the begin token of a code range without a span spec; a continuous
        modality whose input mixes code-range rows (Orthus' soft VQ) still opens its spans from
        text (rows ``in_text``).
        """
        if self.constraint is None:
            return scores
        constrained = self.constraint.apply(scores, states)
        if self.continuous_begins and in_text:
            rows = torch.tensor(in_text, device=scores.device)[:, None]
            constrained[rows, self.continuous_begins] = scores[rows, self.continuous_begins]
        return constrained

    def text_segment(self, ids: list[int], stop: Sequence[str], cut_short: bool = False) -> tuple[str, bool]:
        """Decoded text cut at the first stop string, and whether one was found. ``cut_short``: a
        limit ended the reply here, so a tail that only began a stop string (the end-of-turn marker
        a length limit cut in two: ``<|im_``) is cut too; a stream held it back and the reply never
        became it. A reply the model ended itself keeps such a tail: it was settled as text.
        Whitespace just before a stop string is the marker's, not the reply's (a template's marker
        is tokenised as a text of its own, so SentencePiece gives it a leading space)."""
        text = self.tokenizer.decode(ids)
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            return text[:cut].rstrip(), True
        return (text[: len(text) - _stop_prefix(text, stop)] if cut_short else text), False


class _Run:
    """One sampling generation: the per-row state machine driving the shared cache."""

    def __init__(
        self,
        engine: Engine,
        cache: KVCache,
        prompts: Sequence[EncodedDocument],
        rows: list[_Row],
        on_text: TextCallback | None,
        on_done: DoneCallback | None,
        on_media: MediaCallback | None = None,
    ):
        self.engine, self.cache, self.rows, self.on_text, self.on_done = engine, cache, rows, on_text, on_done
        self.on_media = on_media
        self.model = engine.model
        # conditional rows in the cache; after them the unconditional prompt (while any row may guide),
        # then a partner for each row in a guided span, a copy of that prompt
        self.batch = len(prompts)
        self.template = self.batch if cache.rows > self.batch else -1
        for row in rows:
            row.slot = row.index
        # the token history is kept only when a repetition penalty reads it
        self.track_ids = any(
            row.settings.for_modality(m).repetition_penalty != 1 for row in rows for m in MODALITIES
        )
        self.ids, self.valid = padded_ids(prompts, engine.pad_id, engine.device) if self.track_ids else (None, None)
        # modality id of the position each row feeds next (routes it to its modality's experts)
        self.modality_of: dict[int, int] = {}
        self.pending: list[tuple[Call, str, list[_Row]]] = []  # head calls sent to the worker, oldest first
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
            self._arrange(self.rows)
            for name in {r.mode.name for r in partners}:
                group = [r for r in partners if r.mode.name == name]
                begins = torch.tensor([[r.mode.begin] for r in group], device=self.cache.device)
                self.cache.step_rows([r.partner for r in group], self.cache.embed_tokens(begins), name, False, True)

    # -- the loop ---------------------------------------------------------------------------

    def loop(self) -> None:
        try:
            self._loop()
        finally:
            while self.pending:  # answers for rows that ended meanwhile, or a run that failed
                call, _, rows = self.pending.pop(0)
                try:
                    self.engine.head_worker.features(call, [r.generator for r in rows])
                except HeadWorkerError as err:
                    self._lose_worker(err)

    def _loop(self) -> None:
        while True:
            self._expire(self.rows)
            active = [r for r in self.rows if not r.done]
            if not active:
                return
            self._arrange(active)
            blocks = [r for r in active if r.block_pending]
            if blocks:
                self._denoise_blocks(blocks)
                active = [r for r in active if not r.done]  # a row past its deadline left while denoising
            feed = self._choose(active)
            if all(r.done for r in self.rows):
                return
            if feed:
                self._arrange([r for r in self.rows if r.slot >= 0])  # partners for rows that opened a span
                self._feed(feed)

    def _choose(self, active: list[_Row]) -> dict[int, Any]:
        """Decide each active row's next input: a token id or a continuous embedding ``[H]``. Rows
        whose slot the head worker is drawing sit the step out; those it has answered are fed."""
        feed: dict[int, Any] = {}
        self._collect(feed, wait=False)
        waiting = {r.index for _, _, rows in self.pending for r in rows}
        free = [r for r in active if r.index not in waiting and r.index not in feed]
        sampled = [r for r in free if r.forced is None and (r.mode is None or r.mode.kind == "discrete")]
        drawn = [r for r in free if r.mode is not None and r.mode.kind == "causal" and r.remaining > 0]
        for row in free:
            if row.forced is not None:
                self._advance(row, row.forced, feed)
        if sampled:
            tokens = self._sample_tokens(sampled)
            for row, token in zip(sampled, tokens):
                self._advance(row, token, feed)
        if drawn:
            if self.engine.head_worker is None or not feed:
                self._draw_features(drawn, feed)
            elif not self._drawing(active, feed):  # other rows step while the worker draws
                self._send(drawn)
        if not feed:
            self._collect(feed, wait=True)
        return feed

    def _drawing(self, active: list[_Row], feed: dict[int, Any]) -> bool:
        """Whether rows of causal spans are on their way to their next slot: in a call sent, or
        fed now the slot one brought. Rows ready meanwhile wait to join them in the next call,
        which costs the worker little more than one row's (a call's sampler steps are mostly
        fixed cost): sending whatever is ready would split the rows into groups out of phase,
        each call waiting for the others' in the worker, and the rows' partners and their
        sat-out steps staying in the cache that much longer."""
        return bool(self.pending) or any(
            r.index in feed for r in active if r.mode is not None and r.mode.kind == "causal" and r.remaining > 0
        )

    def _send(self, rows: list[_Row]) -> None:
        """The rows' head calls to the worker (their deadlines are checked between calls, not inside one)."""
        worker = self.engine.head_worker
        for name, members in _by_mode(rows).items():
            settings = _head_settings(members)
            try:
                call = worker.draw(name, self._last_hidden(members), settings["cfg_scale"], settings["steps"], settings["generator"])
            except HeadWorkerError as err:
                self._lose_worker(err)
                return
            self.pending.append((call, name, members))

    def _collect(self, feed: dict[int, Any], wait: bool) -> None:
        """Feed the rows whose slots the worker has drawn: those answered, or (``wait``) the oldest
        call. Other answers that have come (media decoded for replies that ended) are read too."""
        if not self.engine.read_worker():
            self.pending.clear()  # no worker, or it was lost now: the rows it held draw here
            return
        worker = self.engine.head_worker
        while self.pending and (wait or self.pending[0][0].answered):
            wait = False
            call, name, members = self.pending.pop(0)
            try:
                features = worker.features(call, [r.generator for r in members])
            except HeadWorkerError as err:
                self._lose_worker(err)  # the rows' generators are as before the call: they draw again here
                return
            live = [(k, r) for k, r in enumerate(members) if not r.done]
            if live:
                self._place(name, [r for _, r in live], features[[k for k, _ in live]], feed)

    def _lose_worker(self, err: HeadWorkerError) -> None:
        self.pending.clear()
        self.engine.lose_worker(err)

    def _feed(self, feed: dict[int, Any]) -> None:
        """One cache step: every row with an input (and its guidance partner in a guided span)."""
        cache, pad = self.cache, self.engine.pad_id
        token_ids, modality = [pad] * cache.rows, [0] * cache.rows
        real = [False] * cache.rows
        vectors: dict[int, torch.Tensor] = {}
        by_slot: dict[int, Any] = {}
        for index, value in feed.items():
            row = self.rows[index]
            by_slot[row.slot] = value
            for target in [row.slot] + ([row.partner] if row.guided else []):
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
            new_ids = [by_slot.get(i, pad) if isinstance(by_slot.get(i, pad), int) else media for i in range(self.batch)]
            self.ids = torch.cat([self.ids, torch.tensor(new_ids, device=cache.device)[:, None]], 1)
            self.valid = torch.cat([self.valid, torch.tensor(real[: self.batch], device=cache.device)[:, None]], 1)
        mask = None if all(real) else torch.tensor(real, device=cache.device)[:, None]
        routed = self.model.routing is not None  # modality ids are only read by modality experts
        cache.step(embeds[:, None], mask, torch.tensor(modality, device=cache.device)[:, None] if routed else None)

    # -- sampling ---------------------------------------------------------------------------

    def _sample_tokens(self, rows: list[_Row]) -> list[int]:
        engine, cache = self.engine, self.cache
        index = [r.slot for r in rows]
        guided = [i for i, r in enumerate(rows) if r.guided]
        everyone = len(rows) == cache.rows  # every row, in order, and no guidance rows
        hidden = cache.last if everyone else cache.last[index + [rows[i].partner for i in guided]]
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
        scores = self._fit_spans(self._ban(engine.constrain(scores, self._grammar_states(rows), text_rows), rows, text_rows), rows)
        settings = [self._settings(row) for row in rows]  # each row's own, filtered in one pass
        scores = apply_repetition_penalty(scores, ids, valid, [s.repetition_penalty for s in settings])
        return choose(scores, settings, [r.generator for r in rows]).tolist()

    def _grammar_states(self, rows: list[_Row]) -> list[tuple]:
        """Each sampled row's span-grammar state, from the codes of each layer its open span holds,
        counted as they were written: no reading of the history or of the span, which grow with
        every step."""
        constraint = self.engine.constraint
        if constraint is None:
            return []
        return [OUTSIDE if r.mode is None else constraint.counted_state(r.mode.name, r.counts) for r in rows]

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
        return may_open(mode, row.settings, row.budget, row.new, row.used.get(mode.name, 0), row.media)

    def _fit_spans(self, scores: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """A free-length span (speech) stops growing when one more frame would not fit the row's
        budget or its modality's ``max_tokens``: its next layer or end token comes instead, so the
        span ends whole instead of being cut off."""
        layout = self.engine.layout
        for i, row in enumerate(rows):
            spec = self.engine.spans.get(row.mode.name) if row.mode is not None and row.mode.kind == "discrete" else None
            if spec is None or spec.length is not None:
                continue
            name, frames = row.mode.name, len(row.span) - 1
            offset, codebook = layout.range_offset(name), layout.codebook_size(name)
            if frames < spec.min_length or not offset <= row.span[-1] < offset + codebook:
                continue  # below the shortest span, or past layer 0: the length is already set
            # what the span still takes with one more frame: the rest of every layer and the end token
            more = spec.layers * (frames + 1) - frames + 1
            cap = row.settings.for_modality(name).max_tokens
            if (cap is not None and row.used[name] + more > cap) or row.new + more > row.budget:
                scores[i, offset : offset + codebook] = float("-inf")
        return scores

    def _draw_features(self, rows: list[_Row], feed: dict[int, Any]) -> None:
        """Causal continuous spans: the head samples each row's next feature from its last hidden state."""
        for name, members in _by_mode(rows).items():
            head = self.model.continuous[name]

            def draw(group: list[_Row], head=head) -> torch.Tensor:
                # each sampler step runs the head: the rows' clocks are read at each
                return head.sample_next(
                    self._last_hidden(group), **_head_settings(group), on_step=lambda: self._raise_if_expired(group)
                )

            members, features = self._retry_without_expired(members, draw)
            if members:
                self._place(name, members, features, feed)

    def _place(self, name: str, rows: list[_Row], features: torch.Tensor, feed: dict[int, Any]) -> None:
        """Each row's drawn slot: kept in its span (closed after the last slot) and queued for feeding."""
        embeds = embed_features(self.model, name, features)
        for k, row in enumerate(rows):
            row.span.append(features[k].float().cpu())
            row.remaining -= 1
            if row.remaining == 0:
                self._close_span(row, torch.stack(row.span).numpy())
                row.forced = row.mode.end
            self._count(row, embeds[k], feed, name)

    def _denoise_blocks(self, rows: list[_Row]) -> None:
        """Bidirectional continuous spans: denoise whole items, then commit one clean pass."""
        for name, members in _by_mode(rows).items():
            modality = self.model.continuous[name]

            def denoise(group: list[_Row], name=name, modality=modality) -> torch.Tensor:
                cond = [r.slot for r in group]
                both = cond + ([_unconditional(r) for r in group] if any(r.guided for r in group) else [])

                def run_backbone(embeds: torch.Tensor) -> torch.Tensor:
                    self._raise_if_expired(group)  # a denoising step is a whole backbone pass: the clocks are read at each
                    if embeds.shape[0] not in (len(cond), len(both)):
                        raise ValueError(f"run_backbone got {embeds.shape[0]} rows; expected {len(cond)} (or {len(both)} with guidance)")
                    chosen = cond if embeds.shape[0] == len(cond) else both
                    return self.cache.step_rows(chosen, embeds, name, bidirectional=True, commit=False).to(compute_dtype(modality))

                return modality.denoise_block(run_backbone, len(cond), **_head_settings(group))

            members, features = self._retry_without_expired(members, denoise)
            if not members:
                continue
            cond = [r.slot for r in members]
            n, slots, dim = features.shape
            clean = embed_features(self.model, name, features.reshape(n * slots, dim)).reshape(n, slots, -1)
            # the clean image enters the conditional rows and the partners of guided rows
            partners = [k for k, r in enumerate(members) if r.guided]
            self.cache.step_rows(cond + [members[k].partner for k in partners], clean[list(range(n)) + partners], name,
                                 bidirectional=True, commit=True)
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

    def _settings(self, row: _Row) -> SamplingSettings:
        return row.settings.for_modality(row.mode.name if row.mode else "text")

    def _last_hidden(self, rows: list[_Row]) -> torch.Tensor:
        """The last hidden states of ``rows`` (all in one span of one modality), then of their
        guidance partners when they are guided."""
        index = [r.slot for r in rows]
        partners = [_unconditional(r) for r in rows] if any(r.guided for r in rows) else []
        return self.cache.last[index + partners].to(compute_dtype(self.model.continuous[rows[0].mode.name]))

    def _arrange(self, kept: list[_Row]) -> None:
        """Lay the cache out as ``kept`` (the conditional rows to keep, in order) need it: the
        unconditional template while one of them may guide, and a partner for each in a guided
        span (copied from the template when its span has just opened). Every cache row is computed
        at every step, so finished rows and partners whose span has closed leave."""
        template = self.template >= 0 and any(r.guides for r in kept)
        guided = [r for r in kept if r.guided]
        old = [r.slot for r in kept]
        index = old + [self.template] * template + [r.partner if r.partner >= 0 else self.template for r in guided]
        if index == list(range(self.cache.rows)):
            return
        self.cache.reorder(torch.tensor(index, device=self.cache.device))
        if self.track_ids and old != list(range(self.batch)):
            self.ids, self.valid = self.ids[old], self.valid[old]
        for row in self.rows:
            row.slot = row.partner = -1
        for slot, row in enumerate(kept):
            row.slot = slot
        self.batch = len(kept)
        self.template = self.batch if template else -1
        for k, row in enumerate(guided):
            row.partner = self.batch + template + k

    def _expire(self, rows: list[_Row]) -> None:
        """End every row past its deadline or cancelled: it leaves the batch, the others go on."""
        for row in rows:
            reason = None if row.done else expiry(row.deadline)
            if reason is not None:
                self._finish(row, reason)

    def _raise_if_expired(self, rows: list[_Row]) -> None:
        if any(expiry(r.deadline) for r in rows):
            raise _Expired

    def _retry_without_expired(self, rows: list[_Row], call: Callable[[list[_Row]], torch.Tensor]) -> tuple[list[_Row], torch.Tensor | None]:
        """``call(rows)``; when a row expires inside it, that row ends and the call runs again for
        the rest from the same generator states (the cache holds nothing of an interrupted call),
        so they draw what they would have drawn without it."""
        states = [r.generator.get_state() for r in rows]
        while rows:
            try:
                return rows, call(rows)
            except _Expired:
                self._expire(rows)
                kept = [(r, state) for r, state in zip(rows, states) if not r.done]
                for row, state in kept:
                    row.generator.set_state(state)
                rows, states = [r for r, _ in kept], [state for _, state in kept]
        return rows, None

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
            else:
                row.counts[engine.constraint.layer_of(name, token)] += 1
            self._count(row, token, feed, name)
            return
        if token in engine.stop_ids:
            self._finish(row, "stop")
            return
        mode = engine.modes.get(token)
        if mode is None:
            row.text_ids.append(token)
            self._record(row, token, feed, "text")
            self._stream(row)  # before the limits: a stop string completed by the last token allowed is a stop
            cap = row.settings.text.max_tokens
            if row.new >= row.budget or (cap is not None and row.used["text"] >= cap):
                self._finish(row, "length")
            return
        self._flush_text(row)
        self._count(row, token, feed, mode.name)
        if not row.done:
            self._enter(row, mode, token)

    def _enter(self, row: _Row, mode: MediaMode, begin: int) -> None:
        row.mode, row.span, row.media = mode, [begin] if mode.kind == "discrete" else [], row.media + 1
        row.counts = [0] * self.engine.spans[mode.name].layers if mode.kind == "discrete" else []
        row.guided = row.settings.for_modality(mode.name).cfg_scale != 1
        row.remaining = mode.min_positions - 1 if mode.kind == "causal" else 0
        row.block_pending = mode.kind == "bidirectional"

    def _record(self, row: _Row, value: Any, feed: dict[int, Any], name: str) -> None:
        """One position written: queue it and charge it to the budgets."""
        feed[row.index] = value
        self.modality_of[row.index] = MODALITY_IDS[name]
        row.new += 1
        row.used[name] = row.used.get(name, 0) + 1

    def _count(self, row: _Row, value: Any, feed: dict[int, Any], name: str) -> None:
        """:meth:`_record`, then end the row when its budget has run out."""
        self._record(row, value, feed, name)
        if row.new >= row.budget:
            self._finish(row, "length")

    def _codes(self, row: _Row) -> np.ndarray:
        span = extract_spans(row.span, self.engine.layout, {row.mode.name: self.engine.spans[row.mode.name]})[0]
        return span.codes[0] if span.codes.shape[0] == 1 else span.codes

    def _close_span(self, row: _Row, data: np.ndarray) -> None:
        row.segments.append(Segment(row.mode.name, data=data))
        if self.on_media is not None:
            self.on_media(row.index, row.segments[-1])

    def _leave_span(self, row: _Row) -> None:
        row.mode, row.span, row.guided = None, [], False  # its partner leaves the cache

    def _stream(self, row: _Row) -> None:
        """Check stop strings and pass newly decoded text to the callback (held back while it may
        still become a stop string or is an incomplete character)."""
        stop = row.settings.stop
        if not stop and self.on_text is None:
            return
        text, stopped = self.engine.text_segment(row.text_ids, stop)
        if stopped:
            self._finish(row, "stop")
            return
        if self.on_text is None:
            return
        ready = text[: len(text) - _stop_prefix(text, stop)].rstrip("\ufffd")
        if stop:  # trailing whitespace waits for what follows it: before a stop string it is dropped
            ready = ready.rstrip()
        if len(ready) > row.streamed:
            self.on_text(row.index, ready[row.streamed :])
            row.streamed = len(ready)

    def _flush_text(self, row: _Row, cut_short: bool = False) -> None:
        """The row's text so far as a segment (``cut_short`` as :meth:`Engine.text_segment` says)."""
        if not row.text_ids:
            return
        text, _ = self.engine.text_segment(row.text_ids, row.settings.stop, cut_short=cut_short)
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
        self._flush_text(row, cut_short=reason != "stop")
        if self.on_done is not None:
            self.on_done(row.index, row.generation())


class _Expired(Exception):
    """A row of a head call ran past its deadline (caught by ``_retry_without_expired``)."""


EXPIRED = ("timeout", "cancelled")


def may_open(mode: MediaMode, settings: GenerationSettings, budget: int, new: int = 0, used: int = 0, media: int = 0,
             begun: bool = False) -> bool:
    """Whether a row with ``new`` positions written (``used`` of them ``mode``'s) and ``media``
    spans may open a span of ``mode``: the shortest one must fit its budget and the modality's
    ``max_tokens``, and ``max_media`` must allow one more. ``begun``: the begin token is the
    prompt's (a reply that starts inside the span), so the reply does not pay for it."""
    cap = settings.for_modality(mode.name).max_tokens
    needed = mode.min_positions + (0 if begun else 1)
    fits = new + needed <= budget
    under_cap = cap is None or used + needed <= cap
    return media < settings.max_media and fits and under_cap


def _stop_prefix(text: str, stop: Sequence[str]) -> int:
    """The length of the longest tail of ``text`` that begins a stop string (0 when none)."""
    return max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def _by_mode(rows: list[_Row]) -> dict[str, list[_Row]]:
    """Rows grouped by their current media mode: each modality's head runs once per step for
    all of them, whatever their own guidance and step counts."""
    groups: dict[str, list[_Row]] = {}
    for row in rows:
        groups.setdefault(row.mode.name, []).append(row)
    return groups


def _unconditional(row: _Row) -> int:
    """The cache row of ``row``'s unconditional half in a guided head call: its partner, or, for a
    row that is not guided (scale 1, whose conditional output is taken as it is) and may have no
    partner, its own row."""
    return row.partner if row.guided else row.slot


def _head_settings(rows: list[_Row]) -> dict[str, Any]:
    """Per-row sampler settings of rows in one modality's span: guidance scale (1 for a row that
    is not guided), step count and generator."""
    own = [row.settings.for_modality(row.mode.name) for row in rows]
    return {
        "cfg_scale": [s.cfg_scale if row.guided else 1.0 for s, row in zip(own, rows)],
        "steps": [s.steps for s in own],
        "generator": [row.generator for row in rows],
    }


def row_settings(settings: GenerationSettings, count: int) -> list[GenerationSettings]:
    """``count`` rows of ``settings``; a seed ``s`` becomes ``s, s + 1, ...`` so that every row
    has a generator of its own (and reply ``i`` can be had alone with seed ``s + i``)."""
    if settings.seed is None:
        return [settings] * count
    if settings.seed + count - 1 >= 2**63:
        raise ValueError(f"generation settings: seed {settings.seed} leaves no 64-bit seed for {count} replies "
                         f"(reply i takes seed + i): use a seed below {2**63 - count + 1}")
    return [settings.replace(seed=settings.seed + i) for i in range(count)]

