"""The Python chat API: ``unimodal.load(DIR).chat(messages)``.

Messages are OpenAI-style: ``{"role": "system" | "user" | "assistant", "content": ...}`` where
content is a string or a list of parts:

- ``{"type": "text", "text": "..."}``
- ``{"type": "image", "image": PATH | PIL.Image | HxWx3 uint8 array}`` (a float ``[n, D]`` or
  integer array is taken as already-encoded features or codes); also the wire forms
  ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..." | PATH}}`` and
  ``{"type": "image", "path": PATH}``;
- ``{"type": "audio", "audio": PATH | (waveform, sample_rate) | 1-D float waveform at the codec's
  rate}`` (an integer array is taken as codes); also ``{"type": "input_audio", "input_audio":
  {"data": BASE64, "format": "wav"}}`` and ``{"type": "audio", "path": PATH}``.

The conversation is rendered with the model's chat template (``chatml`` | ``vicuna``), encoded
by the same :class:`Processor` as training data, and answered by the
:class:`~unimodal.inference.engine.Engine`. Replies come back as ordered parts; generated media
is decoded by the model's codecs (pictures as ``PIL.Image``, audio as float waveforms) and keeps
the codes or features the model wrote, so a reply can be appended to the history as it is.
When the history does not fit the context, the oldest turns are dropped (system messages stay)
and ``Reply.trimmed`` says how many.
"""

from __future__ import annotations

import logging
import numbers
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from unimodal.checkpoints.load import CONFIG_FILE, Exported, load_exported
from unimodal.data.media import MAX_AUDIO_SECONDS, MAX_PIXELS, MediaBytes, declared_pixels, declared_seconds, decode_media, source_media
from unimodal.data.messages import content_part, message_content
from unimodal.data.processor import EncodedDocument, Processor
from unimodal.inference.constraints import SpanSpec, spans_from_layout
from unimodal.inference.engine import Engine
from unimodal.inference.head_worker import Call, HeadWorker, HeadWorkerError
from unimodal.inference.modes import open_span
from unimodal.inference.outputs import FinishReason, Generation, Segment
from unimodal.modalities.audio import to_mono
from unimodal.modalities.base import AudioTooLong, MediaCodec
from unimodal.modalities.image_continuous import rgb_image
from unimodal.modalities.loading import resolve_device
from unimodal.modalities.vocab import SPAN_MARKERS
from unimodal.models.generation import SAMPLING_KEYS, GenerationSettings
from unimodal.models.unified import UnifiedModel
from unimodal.schema import Document, DocumentError, Part

log = logging.getLogger("unimodal.chat")

Message = dict[str, Any]
# the pixels all the images of one prompt may declare: decoding is the prompt's cost that its
# size on the wire does not show (a 4096x4096 PNG of one colour is 60 kB and about a second)
MAX_PROMPT_PIXELS = 4 * MAX_PIXELS
# characters per position of room past which a history is trimmed from its newest end: encoding
# all of it first (100,000 short messages, 8 MB) would cost seconds to find the few that fit
LONG_HISTORY_CHARS = 32


class ChatError(ValueError):
    """A conversation the assistant cannot take: the message says what to change."""


@dataclass
class ReplyPart:
    """One ordered piece of a reply.

    ``text`` for text; ``image`` (``PIL.Image``) or ``audio`` (float32 waveform) with
    ``sample_rate`` for media the model's codec could decode; ``data`` is what the model wrote
    (codes or continuous features), kept so that the reply can go back into the history.
    """

    type: str
    text: str = ""
    image: Any = None
    audio: np.ndarray | None = None
    sample_rate: int | None = None
    data: np.ndarray | None = None

    def save(self, path: str | Path) -> Path:
        """Write the image (PNG, or any format PIL infers from the suffix) or the audio (WAV)."""
        from PIL import Image

        path = Path(path)
        suffix = path.suffix.lower()
        if path.is_dir():
            raise ValueError(f"cannot write the {self.type} to {path}: it is a directory; give a file name in it")
        if self.type == "image" and self.image is not None:
            if suffix not in Image.registered_extensions():
                raise ValueError(f"cannot write an image as {path.name}: give a path ending in an image format (.png, .jpg, ...)")
            path.parent.mkdir(parents=True, exist_ok=True)
            self.image.save(path)
        elif self.type == "audio" and self.audio is not None:
            import soundfile

            fmt = suffix.lstrip(".").upper() or "WAV"
            if fmt not in soundfile.available_formats():
                raise ValueError(f"cannot write audio as {path.name}: give a path ending in a format soundfile writes (.wav, .flac, .ogg, ...)")
            path.parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(str(path), self.audio, self.sample_rate, format=fmt)
        else:
            raise ValueError(f"this {self.type} part has nothing to save (no codec decoded it)")
        return path

    def to_content(self) -> dict[str, Any]:
        """The part as message content (media as the codes/features the model wrote)."""
        if self.type == "text":
            return {"type": "text", "text": self.text}
        return {"type": self.type, self.type: self.data}


@dataclass
class Reply:
    parts: list[ReplyPart]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    seed: int
    trimmed: int = 0  # messages dropped from the start of the history to fit the context

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if p.type == "text")

    @property
    def images(self) -> list[Any]:
        return [p.image for p in self.parts if p.type == "image"]

    @property
    def audios(self) -> list[tuple[np.ndarray, int]]:
        return [(p.audio, p.sample_rate) for p in self.parts if p.type == "audio"]

    def to_message(self) -> Message:
        return {"role": "assistant", "content": [p.to_content() for p in self.parts]}


@dataclass
class _Turn:
    role: str
    parts: list[Part]


@dataclass
class Assistant:
    """A model ready to chat: the engine plus everything that turns messages into prompts and
    generated codes into media.

    ``processor``: the model's (its chat template renders the messages: ``chatml`` | ``vicuna`` |
    None, messages concatenated without markers; its codecs read and write media). ``spans``:
    the shape of each discrete modality's spans (default: from the codecs).
    ``unconditional``: the user message of the guidance rows; None is an empty prompt (the image
    span alone, what training's conditioning dropout shows the model). ``context_length``:
    prompt plus reply, by default the training sequence length, else the backbone's.
    """

    model: UnifiedModel = field(repr=False)
    processor: Processor = field(repr=False)
    spans: dict[str, SpanSpec | dict[str, Any]] | None = None
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    context_length: int | None = None
    unconditional: str | None = None
    name: str = "unimodal"
    _undecodable: set[str] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.unconditional is not None and not isinstance(self.unconditional, str):
            raise ChatError(f"unconditional must be a string (the guidance rows' user message) or None, got {type(self.unconditional).__name__}")
        if isinstance(self.settings, dict):  # keywords of GenerationSettings.replace
            self.settings = GenerationSettings().replace(**self.settings)
        if not isinstance(self.settings, GenerationSettings):
            raise ChatError(f"settings must be a dict or GenerationSettings, got {type(self.settings).__name__}")
        processor = self.processor
        # prompts end open (no end token); features and attention follow the model's own modules
        self.processor = replace(
            processor,
            add_eos=False,
            feature_dim=processor.feature_dim or next((int(getattr(m, "feature_dim", 0)) for m in self.model.continuous.values()), 0),
            bidirectional=processor.bidirectional
            or tuple(n for n, m in self.model.continuous.items() if getattr(m, "attention", "") == "bidirectional"),
        )
        self.template = processor.chat_template
        if self.spans is None:
            # a continuous modality's own code rows (Orthus' soft VQ) are never generated as codes
            self.spans = spans_from_layout(self.model.layout, processor.codecs, max_seconds=None, skip=tuple(self.model.continuous))
        trained = int(getattr(self.model.backbone.config, "max_position_embeddings", 0) or 0)
        if self.context_length is None:
            self.context_length = processor.seq_len or trained or 2048
        if isinstance(self.context_length, bool) or not isinstance(self.context_length, int) or self.context_length < 2:
            raise ValueError(f"context_length={self.context_length!r}; it must be an integer >= 2 (prompt and reply)")
        if trained and self.context_length > trained:
            log.warning("context_length=%d is beyond the backbone's max_position_embeddings=%d: positions past it were never trained",
                        self.context_length, trained)
        tokenizer = processor.tokenizer
        self.engine = Engine(self.model, tokenizer, spans=self.spans, stop_ids=[tokenizer.eos_id], max_length=self.context_length)
        self.stop = (self.template.stop,) if self.template is not None and self.template.stop else ()

    @property
    def codecs(self) -> dict[str, MediaCodec]:
        return self.processor.codecs

    @property
    def writes(self) -> tuple[str, ...]:
        """The media a reply can hold: text, and each modality the engine has a span mode for."""
        return ("text", *sorted({mode.name for mode in self.engine.modes.values()}))

    @classmethod
    def from_exported(cls, exported: Exported, **overrides: Any) -> Assistant:
        """From :func:`unimodal.checkpoints.load.load_exported`'s result; ``overrides`` replace fields."""
        try:
            saved = GenerationSettings.from_dict(exported.config.get("generation"))
        except ValueError as err:
            where = Path(exported.path) / CONFIG_FILE if exported.path else f"the export's {CONFIG_FILE}"
            raise ChatError(f"{where}, 'generation': {err}; fix it there or export again") from None
        defaults = {
            "model": exported.model,
            "processor": exported.processor,
            "settings": saved,
            "name": Path(exported.path).name if exported.path else "unimodal",
        }
        settings = overrides.pop("settings", None)
        if isinstance(settings, dict):
            overrides["settings"] = saved.replace(**settings)
        elif settings is not None:
            overrides["settings"] = settings
        return cls(**{**defaults, **overrides})

    # ------------------------------------------------------------------------------------------

    def chat(
        self,
        messages: Sequence[Message],
        *,
        on_text: Callable[[str], None] | None = None,
        on_media: Callable[[ReplyPart], None] | None = None,
        start_with: str | None = None,
        **settings: Any,
    ) -> Reply:
        """Reply to one conversation. ``on_text`` receives text as it is generated, and
        ``on_media`` each picture or clip (decoded) as soon as it is written, in the reply's order;
        ``start_with`` (``"image"`` | ``"audio"``) makes the reply open with that medium;
        ``settings`` are :meth:`GenerationSettings.replace` keywords (``temperature=0``,
        ``max_new_tokens=64``, ``image={"cfg_scale": 3}``, ``seed=0``, ...)."""
        _check_callback(on_text)
        _check_callback(on_media, "on_media", "the reply part")
        stream = None if on_text is None else (lambda row, text: on_text(text))
        media = None if on_media is None else (lambda row, part: on_media(part))
        return self.generate([messages], on_text=stream, on_media=media, start_with=start_with, **settings)[0]

    def generate(
        self,
        batch: Sequence[Sequence[Message]],
        *,
        on_text: Callable[[int, str], None] | None = None,
        on_media: Callable[[int, ReplyPart], None] | None = None,
        start_with: str | None = None,
        cancel: threading.Event | None = None,
        **settings: Any,
    ) -> list[Reply]:
        """Reply to several conversations at once (one batched generation); ``cancel`` stops it.
        A shared ``seed`` s gives conversation ``i`` the seed ``s + i``."""
        _check_callback(on_text)
        _check_callback(on_media, "on_media", "the reply part")
        if cancel is not None and not isinstance(cancel, threading.Event):
            raise ChatError(f"cancel must be a threading.Event, got {type(cancel).__name__}")
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], dict):
            raise ChatError("generate takes a list of conversations (each a list of messages); for one conversation use chat(messages)")
        resolved = self.resolve(**settings)
        if not batch:
            return []
        return self.answer([self.prompt(messages, resolved, start_with) for messages in batch], resolved, on_text=on_text,
                           cancel=cancel, on_media=on_media)

    def answer(
        self,
        prompts: Sequence[tuple[EncodedDocument, int]],
        settings: GenerationSettings | Sequence[GenerationSettings],
        *,
        on_text: Callable[[int, str], None] | None = None,
        cancel: threading.Event | Sequence[threading.Event | None] | None = None,
        on_reply: Callable[[int, Reply], None] | None = None,
        on_media: Callable[[int, ReplyPart], None] | None = None,
    ) -> list[Reply]:
        """Replies to prompts made by :meth:`prompt`, in one batched generation. ``settings`` and
        ``cancel`` are one for all or one per prompt: a server batches requests that each keep
        their own (see :meth:`Engine.generate`). ``on_reply(index, reply)`` receives each reply,
        its media decoded, as soon as its row ends; ``on_media(index, part)`` each decoded media
        part as soon as it is written, after the text before it (a stream keeps the reply's order).
        With a head worker, a reply that ends while other rows go on has its media decoded there
        meanwhile, and reaches ``on_reply`` when that is done."""
        replies: dict[int, Reply] = {}
        decoded: dict[int, ReplyPart | None] = {}  # id(segment) -> its part: each item is decoded once
        ended = 0

        def media(index: int, segment: Segment) -> None:
            part = decoded[id(segment)] = self._part(segment)
            if part is not None:
                on_media(index, part)

        def reply(index: int, generation: Generation) -> None:
            replies[index] = self._reply(generation, prompts[index][1], decoded)
            on_reply(index, replies[index])

        def done(index: int, generation: Generation) -> None:
            nonlocal ended
            ended += 1
            if ended == len(prompts) or not self._decode_aside(generation, decoded, lambda: reply(index, generation)):
                reply(index, generation)

        try:
            generations = self.engine.generate([prompt for prompt, _ in prompts], settings, unconditional=self.unconditional_prompt(),
                                               on_text=on_text, cancel=cancel, on_done=done if on_reply is not None else None,
                                               on_media=media if on_media is not None else None)
        finally:  # every item sent to the worker decoded (its reply answered) before the batch returns
            self.engine.read_worker(everything=True)
        return [replies[i] if i in replies else self._reply(g, trimmed, decoded)
                for i, (g, (_, trimmed)) in enumerate(zip(generations, prompts))]

    def start_head_worker(self) -> HeadWorker:
        """Fork the process that draws the causal heads' slots and decodes the media of replies that
        end first (:mod:`unimodal.inference.head_worker`); ``engine.close_worker()`` ends it."""
        self.engine.head_worker = HeadWorker(self.model, self.engine.modes.values(), self.processor.codecs)
        return self.engine.head_worker

    def _decode_aside(self, generation: Generation, decoded: dict[int, ReplyPart | None], then: Callable[[], None]) -> bool:
        """Send the media of ``generation`` not yet decoded to the head worker, and call ``then``
        once every item is back in ``decoded``; False when there is no worker or nothing to send.
        An item the worker fails to decode is decoded here."""
        worker = self.engine.head_worker
        items = [s for s in generation.segments
                 if id(s) not in decoded and s.type in self.processor.codecs and s.type not in self._undecodable]
        if worker is None or not items:
            return False
        left = {id(s) for s in items}

        def back(segment: Segment, there: Any) -> None:
            decoded[id(segment)] = self._part(segment, there)
            left.discard(id(segment))
            if not left:
                then()

        def answered(segment: Segment, call: Call) -> None:
            back(segment, call.answer if call.succeeded else None)

        for k, segment in enumerate(items):
            try:
                worker.decode(segment.type, segment.data, lambda call, segment=segment: answered(segment, call))
            except HeadWorkerError:  # the worker is gone: the engine says so at its next step
                for rest in items[k:]:
                    back(rest, None)
                break
        return True

    def resolve(self, **settings: Any) -> GenerationSettings:
        """The model's own settings with ``settings`` applied (:meth:`GenerationSettings.replace`
        keywords) and the chat template's stop string added."""
        resolved = self.settings.replace(**settings)
        return resolved.replace(stop=tuple(resolved.stop) + tuple(s for s in self.stop if s not in resolved.stop))

    # ------------------------------------------------------------------------------------------
    # prompts

    def prompt(
        self, messages: Sequence[Message], settings: GenerationSettings | None = None, start_with: str | None = None
    ) -> tuple[EncodedDocument, int]:
        """The encoded prompt of a conversation, and how many leading messages were dropped to fit;
        ``start_with`` (``"image"`` | ``"audio"``) opens the reply with that medium."""
        if start_with is not None and start_with not in SPAN_MARKERS:
            raise ChatError(f"start_with={start_with!r}; expected one of {list(SPAN_MARKERS)}")
        if start_with is not None and start_with not in self.writes:
            raise ChatError(f"start_with={start_with!r}, but this model writes {', '.join(self.writes)} only")
        if settings is not None and not isinstance(settings, GenerationSettings):
            raise ChatError(f"settings must be GenerationSettings (Assistant.resolve(**keywords) makes them), got {type(settings).__name__}")
        settings = settings or self.settings
        media = _media_parts(messages)
        if media > self.context_length // 3:  # each decoded and encoded before any is found not to fit
            raise ChatError(f"{media} images and clips: at most {self.context_length // 3} fit in the context of "
                            f"{self.context_length} tokens (each takes 3 positions or more); attach fewer")
        parsed = parse_messages(messages)
        images = [part.data for m in parsed for part in m["content"] if part.type == "image" and isinstance(part.data, MediaBytes)]
        pixels = sum(declared_pixels(image) or 0 for image in images)
        if pixels > MAX_PROMPT_PIXELS:  # decoding them would hold a server's one model thread for seconds each
            raise ChatError(f"the images declare {pixels} pixels in all, over the {MAX_PROMPT_PIXELS} one prompt may have "
                            "(four 4096x4096 images); send fewer or smaller ones")
        turns = [self._turn(m, i) for i, m in enumerate(parsed)]
        reserve = min(settings.max_new_tokens, self.context_length // 2)
        room = self.context_length - reserve
        # the oldest turns go first (an assistant turn left leading the history with them); system
        # turns stay. Each state is how many of the other turns are dropped; fewer turns never make
        # a longer prompt, so the first state that fits is found by bisection: O(log n) encodings.
        # A history of far more text than fits is searched from its newest end (1, 2, 4, ... states
        # back), so that what is encoded is about what fits, not the whole request
        system = [i for i, turn in enumerate(turns) if turn.role == "system"]
        others = [i for i, turn in enumerate(turns) if turn.role != "system"]
        states, start = [0], 0
        while len(others) - start > 1:
            start += 2 if len(others) - start > 2 and turns[others[start + 1]].role == "assistant" else 1
            states.append(start)

        def encode(state: int) -> EncodedDocument:
            # the begin token of start_with is the prompt's: it takes its room, not the reply's
            doc = self._encode([turns[i] for i in sorted(system + others[states[state]:])])
            return doc if start_with is None else open_span(doc, self.model.layout, SPAN_MARKERS[start_with][0])

        low, kept = -1, None  # a state known to be too long (-1: none yet), and one known to fit
        text = sum(len(part.text or "") for turn in turns for part in turn.parts)
        if text <= LONG_HISTORY_CHARS * room:
            prompt = encode(0)
            if len(prompt) <= room:
                kept = 0
            else:
                low = 0
        if kept is None:
            kept = len(states) - 1
            prompt = encode(kept)
            if len(prompt) > room:
                what = "the system prompt and the last message make" if system else "the last message makes"
                raise ChatError(
                    f"{what} a prompt of {len(prompt)} tokens; the context holds {self.context_length} "
                    f"with {reserve} kept for the reply: shorten them, attach less media or lower max_new_tokens"
                )
            step = 1
            while low < 0 < kept:  # a long history: back from the newest turns until a state is too long
                probe = max(kept - step, 0)
                candidate = encode(probe)
                if len(candidate) > room:
                    low = probe
                else:
                    kept, prompt = probe, candidate
                step *= 2
            while kept - low > 1:  # state low is too long, state kept fits and is the prompt
                middle = (low + kept) // 2
                candidate = encode(middle)
                if len(candidate) > room:
                    low = middle
                else:
                    kept, prompt = middle, candidate
        dropped = states[kept]
        if dropped:
            # Reply.trimmed says so (the terminal prints a line, the server returns trimmed_messages)
            log.debug("dropped the %d oldest message(s) to fit the context of %d tokens", dropped, self.context_length)
        try:  # here, not in the batch: a request its settings leave no reply for fails alone
            self.engine.budget(prompt, settings)
        except ValueError as err:
            raise ChatError(str(err)) from None
        return prompt, dropped

    def unconditional_prompt(self) -> EncodedDocument:
        if self.unconditional is None:
            return EncodedDocument(
                ids=np.zeros(0, np.int64), modality=np.zeros(0, np.int8), target=np.zeros(0, bool),
                block=np.zeros(0, np.int32), continuous=np.zeros(0, bool), features=np.zeros((0, self.processor.feature_dim), np.float32),
            )
        return self._encode([self._turn(parse_messages([{"role": "user", "content": self.unconditional}])[0], 0)])

    def _encode(self, turns: list[_Turn]) -> EncodedDocument:
        parts = [Part(p.type, text=p.text, data=p.data, media=p.media, role=t.role if self.template else None, loss=t.role == "assistant")
                 for t in turns for p in t.parts]
        try:
            doc = self.processor.encode(Document(parts, key="chat"))
        except DocumentError as err:
            raise ChatError(str(err).replace("sample 'chat': ", "")) from None
        if self.template is None:
            return doc
        opening = self.processor.tokenizer.encode(self.template.begin["assistant"])
        return doc.extended(opening)

    def _turn(self, message: Message, index: int) -> _Turn:
        """One message with its media decoded and encoded once (trimming re-encodes text only)."""
        parts = []
        for number, part in enumerate(message["content"]):
            if part.type != "text":
                part = Part(part.type, data=self._encode_media(part, f"message {index}, part {number}"), media=number,
                            loss=message["role"] == "assistant")
            parts.append(part)
        return _Turn(message["role"], parts)

    def encode_media(self, item: dict[str, Any]) -> dict[str, Any]:
        """A media content part (any form a message takes) as the codes or features the model's
        codec makes of it, which a message takes as they are: media sent in many turns (the
        terminal's attachments) are read and encoded once."""
        part = parse_messages([{"role": "user", "content": [item]}])[0]["content"][0]
        return {"type": part.type, part.type: self._encode_media(part, "message 0, part 0")}

    def _encode_media(self, part: Part, where: str) -> np.ndarray:
        data, codec = part.data, self.processor.codecs.get(part.type)
        if isinstance(data, MediaBytes):  # decoded here, so a request's media are never all decoded at once
            if codec is not None and part.type == "audio" and (seconds := declared_seconds(data)) is not None:
                try:  # a clip the codec refuses is refused from its header, not decoded first
                    codec.check_seconds(seconds)
                except AudioTooLong as err:
                    raise ChatError(f"{where}: the audio codec cannot read it ({err})") from None
            data = _decode(data, part.type, where)
        waveform = part.type == "audio" and isinstance(data, np.ndarray) and data.ndim == 1 and np.issubdtype(data.dtype, np.floating)
        if isinstance(data, np.ndarray) and data.dtype != np.uint8 and not waveform:
            slots = getattr(self.model.continuous[part.type], "slots_per_item", None) if part.type in self.model.continuous else None
            if slots and data.dtype.kind == "f" and (data.ndim != 2 or len(data) != slots):
                raise ChatError(f"{where}: {part.type} features of shape {data.shape}; one {part.type} is [{slots}, feature_dim] "
                                "as the model's codec writes it")
            return data  # already features or codes
        if codec is None:
            raise ChatError(f"{where}: this model has no {part.type} codec, so it cannot read {part.type} input")
        if waveform:
            if codec.sample_rate is None:
                raise ChatError(f"{where}: give audio as a path or a (waveform, sample_rate) pair")
            data = (data, int(codec.sample_rate))
        try:
            return codec.encode(Part(part.type, data=data, media=part.media, loss=part.loss))
        except (ValueError, RuntimeError) as err:
            raise ChatError(f"{where}: the {part.type} codec cannot read it ({err})") from None

    # ------------------------------------------------------------------------------------------
    # replies

    def _reply(self, generation: Generation, trimmed: int, decoded: dict[int, ReplyPart | None] | None = None) -> Reply:
        """``decoded``: parts already decoded for a stream, by ``id`` of their segment."""
        decoded = decoded or {}
        parts = [part for s in generation.segments if (part := decoded[id(s)] if id(s) in decoded else self._part(s)) is not None]
        return Reply(parts, generation.finish_reason, generation.prompt_tokens, generation.completion_tokens, generation.seed, trimmed)

    def _part(self, segment: Segment, decoded: Any = None) -> ReplyPart | None:
        """The reply part of a segment, its media decoded (``decoded``: the codec's output, made by
        the head worker); None for a clip that decodes to no sound."""
        if segment.type == "text":
            return ReplyPart("text", text=segment.text)
        part = ReplyPart(segment.type, data=segment.data)
        codec = self.processor.codecs.get(segment.type)
        if codec is None:
            return part
        try:
            decoded = codec.decode(segment.data) if decoded is None else decoded
        except NotImplementedError as err:  # an encoder-only codec (the Chameleon VQ-VAE in transformers)
            if segment.type not in self._undecodable:
                self._undecodable.add(segment.type)
                log.warning("the %s codec cannot turn generated %s back into media (%s); such reply parts carry the model's "
                            "raw output only (ReplyPart.data)", segment.type, segment.type, err)
            return part
        if segment.type == "image":
            part.image = _as_pil(decoded)
        else:
            wave, rate = decoded if isinstance(decoded, tuple) else (decoded, codec.sample_rate)
            if rate is None:
                raise ChatError(f"the audio codec {type(codec).__name__} returns no sample rate")
            part.audio, part.sample_rate = np.asarray(wave, dtype=np.float32).reshape(-1), int(rate)
            if part.audio.size == 0:
                log.info("an audio span of %d codes decoded to no samples and is left out of the reply", np.asarray(segment.data).size)
                return None
        return part


def parse_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate messages; each content becomes a list of Parts (media not yet encoded)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    out = []
    for index, message in enumerate(messages):
        where = f"message {index}"
        try:
            role, items = message_content(message, where)
        except DocumentError as err:
            raise ChatError(str(err)) from None
        out.append({"role": role, "content": [_content(item, f"{where}, part {n}") for n, item in enumerate(items)]})
    return out


def _content(item: Any, where: str) -> Part:
    if not isinstance(item, dict):
        raise ChatError(f"{where} is {type(item).__name__}, expected a dict with a 'type'")
    kind = item.get("type")
    if kind in ("image", "audio") and kind in item:
        return Part(kind, data=_media_object(kind, item[kind], where))
    if kind in ("text", "image_url", "input_audio", "image", "audio"):
        try:  # the wire forms, parsed as the data tools parse chat records
            part = content_part(item, Path.cwd(), where)
        except DocumentError as err:
            raise ChatError(str(err)) from None
        return Part(part.type, text=part.text, data=part.data)  # media bytes are decoded when encoded, one at a time
    raise ChatError(f"{where} has type {kind!r}; expected text, image, audio, image_url or input_audio")


def _media_object(kind: str, value: Any, where: str) -> Any:
    """An in-memory image or audio value (or a path to one) as the codec input."""
    if isinstance(value, (str, Path)):  # read as the data tools read a part's file
        try:
            return source_media({"type": kind, "path": str(value)}, Path.cwd(), where, 0)
        except DocumentError as err:
            raise ChatError(str(err)) from None
    if kind == "image" and hasattr(value, "convert") and hasattr(value, "size"):  # PIL.Image
        value = np.asarray(rgb_image(value), dtype=np.uint8)
    if kind == "audio" and isinstance(value, tuple) and len(value) == 2:
        return _waveform_pair(value, where)
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ChatError(f"{where}: the {kind} holds NaN or infinite values")
        if kind == "image" and value.ndim == 3:  # pixels (features are [n, D], codes [n])
            if value.dtype != np.uint8:
                raise ChatError(f"{where}: an HxWxC image array must be uint8 (0-255), got {value.dtype}; "
                                "convert it, e.g. (x * 255).round().astype(np.uint8) for floats in [0, 1]")
            if 0 in value.shape[:2]:
                raise ChatError(f"{where}: the image is {value.shape[1]}x{value.shape[0]} pixels; it needs at least 1x1")
        return value
    raise ChatError(f"{where}: {'an image' if kind == 'image' else 'audio'} must be a path, {'a PIL image or an HxWx3 uint8 array' if kind == 'image' else 'a (waveform, sample_rate) pair'}; got {type(value).__name__}")


def _check_callback(callback: Any, name: str = "on_text", of: str = "the text") -> None:
    if callback is not None and not callable(callback):
        raise ChatError(f"{name} must be a function of {of}, got {type(callback).__name__}")


def _waveform_pair(value: tuple, where: str) -> tuple[np.ndarray, int]:
    """``(waveform, sample_rate)`` as the codecs take it: mono float32, integer PCM scaled to
    [-1, 1] as soundfile reads it."""
    waveform, rate = value
    if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, numbers.Integral) or rate <= 0:
        shown = repr(rate) if rate is None or isinstance(rate, (numbers.Number, str)) else f"a {type(rate).__name__}"
        raise ChatError(f"{where}: audio as (waveform, sample_rate) needs a positive integer rate second, got {shown}")
    try:
        waveform = np.asarray(waveform)
    except (TypeError, ValueError) as err:
        raise ChatError(f"{where}: the waveform of (waveform, sample_rate) is not an array ({err})") from None
    if waveform.dtype.kind in "iu":
        info = np.iinfo(waveform.dtype)
        middle = (int(info.max) + int(info.min) + 1) / 2  # 0 for signed PCM, 128 for 8-bit unsigned
        waveform = (waveform.astype(np.float64) - middle) / (int(info.max) + 1 - middle)
    elif waveform.dtype.kind != "f":
        raise ChatError(f"{where}: the waveform must hold numbers, got {waveform.dtype}")
    try:
        return to_mono(waveform), int(rate)
    except ValueError as err:
        raise ChatError(f"{where}: {err}") from None


def _media_parts(messages: Any) -> int:
    """How many media parts ``messages`` hold, counted before any is read (malformed messages are
    :func:`parse_messages`' to refuse)."""
    kinds = ("image", "audio", "image_url", "input_audio")
    contents = [m.get("content") for m in messages if isinstance(m, dict)] if isinstance(messages, (list, tuple)) else []
    return sum(isinstance(item, dict) and item.get("type") in kinds for content in contents if isinstance(content, list) for item in content)


def _decode(media: MediaBytes, kind: str, where: str) -> Any:
    try:
        return decode_media(media, kind, where)
    except DocumentError as err:
        raise ChatError(str(err)) from None


def _as_pil(decoded: Any) -> Any:
    from PIL import Image

    if isinstance(decoded, Image.Image):
        return decoded
    array = np.asarray(decoded)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def load(path: str | Path, device: str = "auto", max_audio_seconds: float | None = None, **overrides: Any) -> Assistant:
    """An :class:`Assistant` for an export directory (``unimodal export``); ``device`` is
    ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``; ``max_audio_seconds`` replaces the
    longest clip the export's audio codec takes (and writes); ``overrides`` set Assistant fields."""
    if not isinstance(path, (str, Path)):
        raise ChatError(f"load takes the path of an export directory, got {type(path).__name__}")
    unknown = sorted(set(overrides) - {f.name for f in fields(Assistant)} - {"settings"})
    if unknown:
        generation = set(SAMPLING_KEYS) | {f.name for f in fields(GenerationSettings)}
        sampling = [key for key in unknown if key in generation]
        hint = f"; sampling settings go in settings={{{sampling[0]!r}: ...}} or in each chat call" if sampling else ""
        raise ChatError(f"load got unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}{hint}")
    if max_audio_seconds is not None and (isinstance(max_audio_seconds, bool) or not isinstance(max_audio_seconds, numbers.Real)):
        raise ChatError(f"max_audio_seconds must be a number of seconds, got {max_audio_seconds!r}")
    try:
        device = resolve_device(device)
    except ValueError as err:
        raise ChatError(str(err)) from None
    exported = load_exported(path)
    if max_audio_seconds is not None:
        codec = exported.processor.codecs.get("audio")
        if codec is None:
            raise ChatError(f"{path} has no audio codec, so max_audio_seconds does not apply")
        if not 0 < max_audio_seconds <= MAX_AUDIO_SECONDS:
            raise ChatError(f"max_audio_seconds must be in (0, {MAX_AUDIO_SECONDS:g}], got {max_audio_seconds:g}")
        codec.max_seconds = float(max_audio_seconds)
    exported.model.to(device)
    # the served model id: the directory as the user named it (runs/demo/model, not the export
    # its symlink points to)
    typed = Path(path).name or Path(path).resolve().name
    return Assistant.from_exported(exported, **{"name": typed, **overrides})
