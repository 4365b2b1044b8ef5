"""An OpenAI-compatible HTTP server over an :class:`~unimodal.inference.chat.Assistant`.

Endpoints: ``POST /v1/chat/completions`` (non-streaming, and ``"stream": true`` server-sent
events for text), ``GET /v1/models``, ``GET /health``. Input content parts are the OpenAI ones:
``text``, ``image_url`` (``data:`` URLs only: a server reads no files and fetches nothing) and
``input_audio`` (base64 + format). A reply whose content is text only is a string, as in
OpenAI's API; a reply with media is a list of parts in the order the model wrote them, media
in the same shapes as the inputs (``image_url`` with a PNG data URL, ``input_audio`` with base64
WAV), so a client can put the message back into the history as it came.

Limits answer with OpenAI-style errors (``{"error": {"message", "type", "code"}}``): a body over
``max_request_bytes`` is 413, a generation over ``max_seconds`` is 408, ``max_tokens`` or ``n``
above the server's caps is 400, and so is a diffusion ``steps``, ``cfg_scale``, ``num_beams`` or
``max_media`` above 4x the model's own setting (:func:`sampling_caps`), a missing or wrong
bearer token (when ``api_key`` is set) is 401, a request that waits longer than ``max_seconds``
behind others is 429, and a generation cut short by a shutdown is 503. Concurrent requests are
answered together (:class:`~unimodal.inference.batcher.Batcher`: up to ``max_batch`` rows in one
engine batch, each with its own settings, seed and deadline); a request whose deadline passes
leaves its batch with a 408 and a client that disconnects cancels its rows. Extension fields
``top_k``, ``repetition_penalty``, ``num_beams``, ``max_media``, ``start_with``, ``timeout_s``
(at most ``max_seconds``) and per-modality ``image`` / ``audio`` settings pass through to
:meth:`GenerationSettings.replace`. OpenAI's audio output options (``modalities``, ``audio``'s
``voice`` and ``format``) return the first spoken clip as ``message.audio``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import io
import json
import logging
import math
import secrets
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from unimodal.data.media import starts_as
from unimodal.errors import UserError
from unimodal.schema import NotJSON, read_json
from unimodal.inference.batcher import Batcher, Busy, Job
from unimodal.inference.chat import Assistant, ChatError, Reply, ReplyPart
from unimodal.inference.outputs import GenerationTimeout

log = logging.getLogger("unimodal.serve")

# sampling fields this server reads besides messages, max_tokens, stop, n and stream
FIELD_TYPES = {
    "temperature": (int, float), "top_p": (int, float), "repetition_penalty": (int, float), "top_k": int,
    "num_beams": int, "seed": int, "max_media": int, "image": dict, "audio": dict, "timeout_s": (int, float),
}
SAMPLING_FIELDS = tuple(FIELD_TYPES)
# OpenAI fields that would change the answer, refused unless empty, zero, false or their default
UNSUPPORTED = {
    "tools": "tool calling", "functions": "function calling", "logprobs": "log-probabilities",
    "top_logprobs": "log-probabilities", "logit_bias": "logit biases", "frequency_penalty": "frequency penalties",
    "presence_penalty": "presence penalties", "prediction": "predicted outputs", "web_search_options": "web search",
    "verbosity": "verbosity settings", "moderation": "moderation",
}
# ... and those whose listed values ask for what this server does anyway
NEUTRAL = {"tool_choice": ("none", "auto"), "function_call": ("none", "auto"), "reasoning_effort": ("none",)}
# OpenAI fields that change nothing here: accepted and ignored
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier", "prompt_cache_key",
           "prompt_cache_retention", "prompt_cache_options")
KNOWN_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "stop", "n", "stream", "stream_options",
                "start_with", "modalities", "response_format", *SAMPLING_FIELDS, *UNSUPPORTED, *NEUTRAL, *IGNORED}


@dataclass(frozen=True)
class ServerLimits:
    max_request_bytes: int = 20 * 2**20
    max_seconds: float = 300.0
    max_new_tokens: int = 4096
    max_n: int = 8
    max_batch: int = 8  # rows (a request's n counts n times) answered together
    batch_window_s: float = 0.01  # how long a batch's first request waits for others to join it
    max_waiting: int = 64  # requests waiting for the model; more get 429 at once (each holds its body)

    def __post_init__(self) -> None:
        names = {"max_request_bytes": "--max_request_mb", "max_seconds": "--max_seconds", "max_new_tokens": "--max_tokens",
                 "max_n": "max_n", "max_batch": "--max_batch", "max_waiting": "--max_waiting"}
        for field_name, option in names.items():
            value = getattr(self, field_name)
            if not (value > 0 and math.isfinite(value)):
                shown = f"{value / 2**20:g}" if field_name == "max_request_bytes" else value  # as typed, in MB
                raise ValueError(f"{option} must be positive and finite, got {shown}")
        if self.batch_window_s < 0:
            raise ValueError(f"batch_window_s must be >= 0, got {self.batch_window_s}")


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status. OpenAI's SDKs send a request
    again after a 408, a 429 or a 5xx unless the response says ``x-should-retry: false``, which
    ``final`` sends: a generation that ran out of time or failed would only do so again."""

    def __init__(self, status: int, message: str, code: str = "invalid_request", final: bool = False):
        super().__init__(message)
        self.status, self.message, self.code, self.final = status, message, code, final

    def payload(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "code": self.code}}


def create_app(
    assistant: Assistant, api_key: str | None = None, limits: ServerLimits | None = None, model_name: str | None = None,
    batcher: Batcher | None = None,
) -> FastAPI:
    """The FastAPI application (run it with uvicorn, or :func:`serve`); ``batcher``: the one that
    answers its requests (default: one on a thread of its own)."""
    limits = limits or ServerLimits()
    api_key = api_key.strip() if api_key is not None else None  # a header cannot end in the newline a key file has
    name = model_name or assistant.name
    created = int(time.time())
    caps = sampling_caps(assistant)
    audio_rate = getattr(assistant.processor.codecs.get("audio"), "sample_rate", None)
    batcher = batcher or Batcher(assistant, max_rows=limits.max_batch, gather_s=limits.batch_window_s, max_waiting=limits.max_waiting)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(batcher.stop)  # SIGTERM: the running batch ends at its next step

    app = FastAPI(title="unimodal", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.payload(), status_code=err.status, headers={"x-should-retry": "false"} if err.final else None)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException) -> JSONResponse:  # unknown paths and methods
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "invalid_request")
        return await _api_error(request, APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", code))

    # a dependency, not an HTTP middleware: Starlette's BaseHTTPMiddleware hides a client's
    # disconnect from a streaming response, which must see it to cancel the generation
    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name}

    served = {"id": name, "object": "model", "created": created, "owned_by": "unimodal"}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [served]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != name:
            raise APIError(404, f"model {model_id!r} does not exist here; this server serves {name!r}", "model_not_found")
        return served

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request):
        body = await _read_body(request, limits.max_request_bytes)
        call = parse_request(body, name, limits, audio_rate)
        check_caps(call.settings, caps)
        unwritable = sorted({call.start_with, "audio" if call.audio_format else None} - {None} - set(assistant.writes))
        if unwritable:
            raise APIError(400, f"this model cannot write {unwritable[0]}: its replies hold {', '.join(assistant.writes)} only")
        unused = [name for name in ("image", "audio") if call.settings.get(name) and name not in assistant.writes]
        if unused:  # settings that would silently change nothing
            raise APIError(400, f"{unused[0]} settings were given, but this model's replies hold {', '.join(assistant.writes)} only")
        if call.stream:
            loop, pieces = asyncio.get_running_loop(), asyncio.Queue()

            def put(choice: int, piece: str | ReplyPart) -> None:  # from the worker thread
                loop.call_soon_threadsafe(pieces.put_nowait, piece)

            job = batcher.submit(_job(call, batcher, limits, on_text=put, on_media=put))
            # a request refused once its prompt is made (unreadable media, too long) gets its 4xx
            # before the stream's 200 is sent
            await _wait(job, batcher, limits, request, job.accepted)
            return StreamingResponse(_stream(batcher, job, pieces, call, limits, name), media_type="text/event-stream")
        job = batcher.submit(_job(call, batcher, limits))
        replies = await _wait(job, batcher, limits, request)
        return completion(replies, name, call.audio_format)

    return app


@dataclass
class Call:
    """A parsed chat completion request."""

    messages: list[dict[str, Any]]
    settings: dict[str, Any]
    n: int
    stream: bool
    start_with: str | None
    # set when the client asks for audio output (OpenAI's ``modalities`` / ``audio``): the first
    # clip of a reply then comes as ``message.audio`` in this format
    audio_format: str | None = None
    # stream_options.include_usage: usage in a chunk of its own after the last, as OpenAI sends it
    usage_chunk: bool = False
    # the media OpenAI's ``modalities`` leaves out: replies do not write them
    left_out: tuple[str, ...] = ()


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"the request body is larger than this server's limit of {limit} bytes (--max_request_mb)", "request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
    except ClientDisconnect:  # gone before the body ended: nobody to answer, nothing to log
        raise APIError(400, "the client closed the connection before the body ended") from None
    return bytes(body)


def parse_request(body: bytes, name: str, limits: ServerLimits, audio_rate: int | None = None) -> Call:
    """Validate a ``/v1/chat/completions`` body; every problem is a 400 with a clear message.
    ``audio_rate``: the model's audio codec's sample rate, the rate of raw ``pcm16`` clips sent back."""
    try:
        payload = read_json(body.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise APIError(400, f"the body is not UTF-8 (byte {err.start}); JSON bodies are UTF-8") from None
    except NotJSON as err:
        raise APIError(400, f"the body is not valid JSON: {err}") from None
    if not isinstance(payload, dict):
        raise APIError(400, "the body must be a JSON object")
    model = payload.get("model")
    if model is not None and model != name:
        raise APIError(404, f"model {model!r} does not exist here; this server serves {name!r}", "model_not_found")
    unknown = sorted(set(payload) - KNOWN_FIELDS)
    if unknown:
        raise APIError(400, f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; this server reads "
                            f"{', '.join(sorted(KNOWN_FIELDS - set(UNSUPPORTED) - set(NEUTRAL) - set(IGNORED)))} (docs/serving.md)")
    for key, what in UNSUPPORTED.items():
        if payload.get(key):
            raise APIError(400, f"{key}: this server does not support {what}")
    for key, allowed in NEUTRAL.items():
        if payload.get(key) not in (None, *allowed):
            raise APIError(400, f"{key}={json.dumps(payload[key])}: this server takes only {' or '.join(map(json.dumps, allowed))}")
    if payload.get("response_format") not in (None, {"type": "text"}):
        raise APIError(400, "response_format: only text responses are supported")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list")
    messages = [_spoken_reply_as_content(message, i, audio_rate) for i, message in enumerate(messages)]
    for i, message in enumerate(messages):
        _check_message(message, i)
    settings = {key: payload[key] for key in SAMPLING_FIELDS if payload.get(key) is not None}
    for key, value in settings.items():
        expected = FIELD_TYPES[key]
        if isinstance(value, bool) or not isinstance(value, expected):
            kind = {dict: "an object", int: "an integer"}.get(expected, "a number")
            raise APIError(400, f"{key} must be {kind}")
    if not 0 < settings.get("timeout_s", limits.max_seconds) <= limits.max_seconds:
        raise APIError(400, f"timeout_s must be in (0, {limits.max_seconds:g}], this server's limit (--max_seconds)")
    audio_format, left_out = _audio_output(payload, settings)
    for field in ("max_tokens", "max_completion_tokens"):  # the newer name wins where both are sent
        max_tokens = payload.get(field)
        if max_tokens is None:
            continue
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise APIError(400, f"{field} must be a positive integer")
        if max_tokens > limits.max_new_tokens:
            raise APIError(400, f"{field}={max_tokens} is more than this server allows ({limits.max_new_tokens})")
        settings["max_new_tokens"] = max_tokens
    stop = payload.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise APIError(400, "stop must be a string or a list of up to 4 non-empty strings")
        settings["stop"] = tuple(stop)
    n = payload.get("n")
    n = 1 if n is None else n
    most = min(limits.max_n, limits.max_batch)  # a request's replies are generated together, at most --max_batch of them
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= most:
        raise APIError(400, f"n must be an integer in [1, {most}]" + (" (--max_batch)" if most < limits.max_n else ""))
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false")
    stream = bool(stream)
    if stream and n != 1:
        raise APIError(400, "stream=true needs n=1")
    options = payload.get("stream_options")
    # include_obfuscation pads events against length side channels, which a local server has no use for
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}
                                or not all(isinstance(v, bool) for v in options.values())):
        raise APIError(400, 'stream_options must be {"include_usage": true|false}, with stream=true')
    usage_chunk = bool((options or {}).get("include_usage"))
    start_with = payload.get("start_with")
    if start_with not in (None, "image", "audio"):
        raise APIError(400, "start_with must be 'image' or 'audio'")
    if start_with in left_out:
        raise APIError(400, f"start_with is {start_with!r}, which modalities leave out")
    contradicted = [name for name in left_out if settings.get(name)]
    if contradicted:  # settings that would silently change nothing
        raise APIError(400, f"{contradicted[0]} settings were given, but modalities leave {contradicted[0]} out")
    return Call(messages, settings, n, stream, start_with, audio_format, usage_chunk, left_out)


AUDIO_FORMATS = ("wav", "flac", "pcm16")
MODALITY_NAMES = ("text", "image", "audio")


def _audio_output(payload: dict[str, Any], settings: dict[str, Any]) -> tuple[str | None, tuple[str, ...]]:
    """OpenAI's output options: ``modalities`` and ``audio.format`` / ``audio.voice`` (which
    ``settings["audio"]`` must not keep: the rest of ``audio`` is sampling settings). Returns the
    format of ``message.audio`` (None: no audio output asked for) and the media ``modalities``
    leaves out. The voice is accepted and ignored: a model speaks with the voice it was trained on."""
    modalities = payload.get("modalities")
    if modalities is not None and (not isinstance(modalities, list) or not all(m in MODALITY_NAMES for m in modalities)
                                   or "text" not in modalities):
        raise APIError(400, f"modalities must be a list of {', '.join(MODALITY_NAMES)} that holds text")
    left_out = tuple(m for m in ("image", "audio") if modalities is not None and m not in modalities)
    audio = settings.get("audio")
    options = {}
    if isinstance(audio, dict):
        options = {key: audio[key] for key in ("voice", "format") if key in audio}
        sampling = {key: value for key, value in audio.items() if key not in options}
        if sampling:
            settings["audio"] = sampling
        else:
            settings.pop("audio")
    if "voice" in options and not isinstance(options["voice"], str):
        raise APIError(400, "audio.voice must be a string")
    fmt = options.get("format", "wav")
    if fmt not in AUDIO_FORMATS:
        raise APIError(400, f"audio.format must be one of {', '.join(AUDIO_FORMATS)}")
    wanted = (modalities is not None and "audio" in modalities) or bool(options)
    if wanted and "audio" in left_out:
        raise APIError(400, "an audio object asks for audio output, which modalities leave out")
    return (fmt if wanted else None), left_out


def sampling_caps(assistant: Assistant, factor: float = 4.0) -> dict[str, float]:
    """The largest per-request settings this server takes: ``factor`` times the model's own
    defaults (diffusion steps, guidance, beams, media per reply), so that one request cannot hold
    the model for ever, and no more diffusion steps than the schedule has timesteps (a sampler
    asked for more fails). Keys are dotted as in a request (``image.steps``)."""
    settings = assistant.settings
    caps = {"max_media": factor * max(settings.max_media, 1)}
    for name in ("text", "image", "audio"):
        own = settings.for_modality(name)
        module = assistant.model.continuous[name] if name in assistant.model.continuous else None
        schedule = getattr(getattr(module, "schedule", None), "config", None)
        steps = own.steps or getattr(schedule, "sample_steps", None)
        if steps:  # a sampler takes no more steps than its schedule has timesteps
            caps[f"{name}.steps"] = min(factor * steps, getattr(schedule, "train_steps", math.inf))
        caps[f"{name}.cfg_scale"] = factor * max(own.cfg_scale, 1.0)
    caps["text.num_beams"] = factor * settings.text.num_beams  # media are never beam-searched
    return caps


def check_caps(settings: dict[str, Any], caps: dict[str, float]) -> None:
    """A 400 naming the cap for any request setting above it (text settings may come flat)."""
    flat = {f"text.{k}": v for k, v in settings.items() if f"text.{k}" in caps}
    flat.update({k: v for k, v in settings.items() if k in caps})
    for name in ("text", "image", "audio"):
        nested = settings.get(name)
        if isinstance(nested, dict):
            flat.update({f"{name}.{k}": v for k, v in nested.items() if f"{name}.{k}" in caps})
    for key, value in flat.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > caps[key]:
            within = ", within its diffusion schedule's timesteps" if key.endswith(".steps") else ""
            raise APIError(400, f"{key}={value} is more than this server allows ({caps[key]:g}, 4x the model's own setting{within})")


def _spoken_reply_as_content(message: Any, index: int, audio_rate: int | None) -> Any:
    """An assistant message with ``audio`` (a spoken reply as :func:`message_fields` returns it)
    as content parts again: its ``content`` (or, when that is null, its ``transcript``), then the
    clip, unless ``content`` holds it already. This server keeps no replies, so a clip sent back
    by ``id`` alone is refused."""
    if not isinstance(message, dict) or message.get("role") != "assistant" or message.get("audio") is None:
        return message
    if isinstance(message.get("content"), list) and any(isinstance(p, dict) and p.get("type") == "input_audio" for p in message["content"]):
        return message  # a reply of several media keeps every part in content: the clip is there already
    audio, where = message["audio"], f"messages[{index}].audio"
    if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
        raise APIError(400, f"{where} has no 'data': this server keeps no replies, so send the clip back with the "
                            "data it came with, or its transcript as text content")
    try:
        clip = base64.b64decode(audio["data"], validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}.data is not valid base64") from None
    # an mp3 by its ID3 tag only: the frame-sync bytes of a bare one are also two pcm16 samples
    fmt = next((ext for ext in ("wav", "flac", "ogg") if starts_as(ext, clip)), "mp3" if clip.startswith(b"ID3") else "pcm16")
    if fmt == "pcm16":  # raw 16-bit samples at the codec's rate, as format pcm16 returned them
        if audio_rate is None or len(clip) % 2:
            raise APIError(400, f"{where}.data is not a wav, flac, ogg or mp3 file, nor pcm16 samples this model can read")
        import soundfile

        buffer = io.BytesIO()
        soundfile.write(buffer, np.frombuffer(clip, "<i2"), audio_rate, format="WAV", subtype="PCM_16")
        fmt, clip = "wav", buffer.getvalue()
    content = message.get("content")
    if content is None:
        transcript = audio.get("transcript")
        content = [{"type": "text", "text": transcript}] if isinstance(transcript, str) and transcript else []
    elif isinstance(content, str):
        content = [{"type": "text", "text": content}]
    elif not isinstance(content, list):
        raise APIError(400, f"messages[{index}].content must be a string or a list of parts")
    spoken = {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip).decode(), "format": fmt}}
    return {**message, "content": [*content, spoken]}


def _check_message(message: Any, index: int) -> None:
    """Only wire forms a remote client may send: no file paths, no URLs to fetch."""
    if not isinstance(message, dict):
        raise APIError(400, f"messages[{index}] must be an object")
    content = message.get("content")
    if isinstance(content, str) or content is None:
        return
    if not isinstance(content, list):
        raise APIError(400, f"messages[{index}].content must be a string or a list of parts")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        where = f"messages[{index}].content[{j}]"
        if kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url.startswith("data:"):
                raise APIError(400, f"{where}: image_url must be a data: URL (data:image/png;base64,...); this server fetches nothing")
        elif kind not in ("text", "input_audio"):
            raise APIError(400, f"{where}: part type {kind!r} is not supported (text, image_url, input_audio)")


def _job(call: Call, batcher: Batcher, limits: ServerLimits, on_text: Callable[[int, str], None] | None = None,
         on_media: Callable[[int, ReplyPart], None] | None = None) -> Job:
    """The batcher's job for a request: it may wait ``max_seconds`` for the model, then generate
    for its own ``timeout_s`` (default ``max_seconds``)."""
    settings = dict(call.settings)
    for name in set(call.left_out) & set(batcher.assistant.writes):  # a span of it never opens, nor is it guided
        settings[name] = {"max_tokens": 0, "cfg_scale": 1.0}
    timeout = float(settings.pop("timeout_s", limits.max_seconds))
    settings.setdefault("max_new_tokens", min(batcher.assistant.settings.max_new_tokens, limits.max_new_tokens))
    try:  # a setting out of range is a 400 now, not once the batches ahead of the request have ended
        batcher.assistant.resolve(**settings, timeout_s=timeout)
    except (ChatError, ValueError) as err:
        raise APIError(400, _request_terms(str(err))) from None
    return Job(call.messages, settings, timeout_s=timeout, wait_until=time.monotonic() + limits.max_seconds, n=call.n,
               start_with=call.start_with, on_text=on_text, on_media=on_media)


async def _wait(job: Job, batcher: Batcher, limits: ServerLimits, request: Request | None = None,
                outcome: Future | None = None) -> Any:
    """The job's replies (or another of its futures, ``outcome``); a client that disconnects
    meanwhile cancels its rows, and a job still waiting for the model at its ``wait_until`` is a
    429 then, not once the batches ahead of it have ended."""
    future = asyncio.wrap_future(outcome or job.future)
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.5)
            if done:
                return _result(future, job, batcher, limits)
            if time.monotonic() > job.wait_until and job.future.cancel():  # not started: the worker will skip it
                raise APIError(429, f"the server is busy: the request waited {time.monotonic() - job.arrived:.1f} s for the model; "
                                    "retry later", "busy")
            if request is not None and await request.is_disconnected():
                job.cancel.set()
                if job.future.cancel():  # still waiting: it takes no row, and its messages go now
                    job.messages = []
                    raise APIError(400, "the client closed the connection while the request waited")
    except asyncio.CancelledError:
        job.cancel.set()
        future.cancel()  # nobody reads the outcome now
        raise


def _result(future: asyncio.Future, job: Job, batcher: Batcher, limits: ServerLimits) -> list[Reply]:
    """The replies, or the failure as an HTTP error."""
    try:
        return future.result()
    except Busy as err:
        raise APIError(429, f"the server is busy: {err}; retry later", "busy") from None
    except GenerationTimeout:
        if batcher.stopping.is_set():
            raise APIError(503, "the server is shutting down; send the request again when it is back", "shutting_down") from None
        raise APIError(
            408, f"the request ran longer than its limit of {job.timeout_s:g} s (timeout_s, at most --max_seconds "
            f"{limits.max_seconds:g}; reading its media counts); ask for fewer tokens (max_tokens) or send less media",
            "timeout", final=True,
        ) from None
    except ChatError as err:  # refused when its prompt was made
        raise APIError(400, _request_terms(str(err))) from None
    except Exception as err:  # noqa: BLE001 - any other failure is the server's, and says so in JSON
        log.error("generation failed", exc_info=err)
        raise APIError(500, f"generation failed: {type(err).__name__}: {err}", "server_error", final=True) from None


def _request_terms(message: str) -> str:
    """An engine's message in the request's terms: its max_new_tokens is a request's max_tokens."""
    return re.sub(r"\bmax_new_tokens\b", "max_tokens", message)


def completion(replies: list[Reply], name: str, audio_format: str | None = None) -> dict[str, Any]:
    prompt = replies[0].prompt_tokens
    generated = sum(r.completion_tokens for r in replies)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": [
            {"index": i, "message": {"role": "assistant", **message_fields(r.parts, audio_format)}, "finish_reason": r.finish_reason}
            for i, r in enumerate(replies)
        ],
        "usage": {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated},
        "unimodal": {"seeds": [r.seed for r in replies], "trimmed_messages": replies[0].trimmed},
    }


def message_fields(parts: list[ReplyPart], audio_format: str | None) -> dict[str, Any]:
    """``content`` (and ``audio``): with audio output asked for, the reply's first clip is
    ``audio`` as OpenAI returns it (``id``, base64 ``data``, ``expires_at``, and the reply's text
    as ``transcript``). A reply of that clip and text has ``content`` None (the text is the
    transcript); one with more media keeps every part in ``content`` in order, the first clip
    too, since a clip taken out of the middle could not be put back in its place. Otherwise
    every part stays in ``content``."""
    first = next((i for i, p in enumerate(parts) if p.type == "audio"), None) if audio_format else None
    if first is None:
        return {"content": content(parts)}
    audio = {
        "id": f"audio_{uuid.uuid4().hex}",
        "data": base64.b64encode(encode_audio(parts[first], audio_format)).decode(),
        "expires_at": int(time.time()) + 3600,
        "transcript": "".join(p.text for p in parts if p.type == "text"),
    }
    media = sum(p.type != "text" for p in parts)
    # pcm16 has no header to carry its rate, so clips inside content stay files
    return {"content": content(parts, audio_format if audio_format != "pcm16" else "wav") if media > 1 else None, "audio": audio}


def encode_audio(part: ReplyPart, fmt: str) -> bytes:
    if part.audio is None:
        raise APIError(500, "the model wrote audio that its codecs cannot decode", "no_codec", final=True)
    if fmt == "pcm16":  # OpenAI's raw form: 16-bit little-endian samples at the codec's rate
        return (np.clip(part.audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, part.audio, part.sample_rate, format=fmt.upper())
    return buffer.getvalue()


def content(parts: list[ReplyPart], audio_format: str = "wav") -> str | list[dict[str, Any]]:
    """A string for text-only replies, else the ordered parts with media as base64."""
    if all(p.type == "text" for p in parts):
        return "".join(p.text for p in parts)
    return [wire_part(p, audio_format) for p in parts]


def wire_part(part: ReplyPart, audio_format: str = "wav") -> dict[str, Any]:
    if part.type == "text":
        return {"type": "text", "text": part.text}
    buffer = io.BytesIO()
    if part.type == "image":
        if part.image is None:
            raise APIError(500, "the model wrote an image that its codecs cannot decode", "no_codec", final=True)
        part.image.save(buffer, format="PNG")
        return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}}
    data = base64.b64encode(encode_audio(part, audio_format)).decode()
    return {"type": "input_audio", "input_audio": {"data": data, "format": audio_format}}


async def _stream(batcher: Batcher, job: Job, queue: asyncio.Queue, call: Call, limits: ServerLimits, name: str) -> AsyncIterator[str]:
    """Server-sent events, in the reply's order: a role chunk, then text deltas and media parts as
    they are written (``job`` puts them in ``queue``): a picture or clip is a ``delta.content``
    list of one part, and with audio output asked for, the first clip is ``delta.audio`` too (the
    content a client rebuilds holds every part, so it goes back into a history as it came).
    A last chunk has the finish reason and usage (and the clip's transcript). A client that
    disconnects cancels the generation (Starlette cancels this generator)."""
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    clip_id: str | None = None

    def chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> str:
        """One event; ``delta`` None: a chunk with no choices (the usage chunk)."""
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name, "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n"

    async def finish() -> None:
        try:
            outcome: Reply | Exception = (await _wait(job, batcher, limits))[0]
        except Exception as err:  # noqa: BLE001 - every failure becomes an error event
            outcome = err
        await queue.put(outcome)

    waiter = asyncio.ensure_future(finish())
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            item = await queue.get()
            if isinstance(item, str):
                yield chunk({"content": item})
            elif isinstance(item, ReplyPart):
                fmt = call.audio_format if call.audio_format not in (None, "pcm16") else "wav"
                part = wire_part(item, fmt)
                delta: dict[str, Any] = {"content": [part]}
                if item.type == "audio" and call.audio_format and clip_id is None:
                    clip_id = f"audio_{uuid.uuid4().hex}"
                    same = fmt == call.audio_format  # encoded once unless message.audio is raw pcm16
                    data = part["input_audio"]["data"] if same else base64.b64encode(encode_audio(item, call.audio_format)).decode()
                    delta["audio"] = {"id": clip_id, "data": data, "expires_at": int(time.time()) + 3600}
                yield chunk(delta)
            else:
                for event in _last_events(item, chunk, call, clip_id):
                    yield event
                yield "data: [DONE]\n\n"
                return
    finally:
        waiter.cancel()  # a disconnected client: _wait cancels the job, whose rows leave their batch


def _last_events(outcome: Reply | Exception, chunk: Callable[..., str], call: Call, clip_id: str | None) -> Iterator[str]:
    """The stream's last chunk: the finish reason, usage (or, with ``include_usage``, usage in a
    chunk of its own with no choices) and the transcript of the clip sent as ``delta.audio``
    (``clip_id``); or the error. Text and media were sent as they came."""
    if isinstance(outcome, Reply):
        transcript = "".join(p.text for p in outcome.parts if p.type == "text")
        delta = {"audio": {"id": clip_id, "transcript": transcript}} if clip_id is not None else {}
        usage = {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
                 "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}
        if call.usage_chunk:
            yield chunk(delta, outcome.finish_reason)
            yield chunk(None, usage=usage)
        else:
            yield chunk(delta, outcome.finish_reason, usage=usage)
        return
    err = outcome if isinstance(outcome, APIError) else APIError(500, f"generation failed: {outcome}", "server_error")
    if not isinstance(outcome, APIError):
        log.error("generation failed", exc_info=outcome)
    yield f"data: {json.dumps(err.payload())}\n\n"


def serve(assistant: Assistant, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: ServerLimits | None = None, model_name: str | None = None, head_worker: bool | None = None) -> None:
    """Run the server until interrupted. HTTP is served from a thread; the model generates on this
    one, the thread that loaded it (:class:`Batcher`). ``head_worker``: draw picture slots, and
    decode the media of replies that end while others go on, in a second process
    (:mod:`unimodal.inference.head_worker`); None: where it pays off."""
    import uvicorn

    from unimodal.inference.head_worker import causal_heads, wanted

    limits = limits or ServerLimits()
    engine = assistant.engine
    if head_worker is None:
        head_worker = wanted(assistant.model, engine.modes.values(), engine.device)
    elif head_worker and (engine.device.type != "cpu" or not causal_heads(assistant.model, engine.modes.values())):
        raise UserError("--head_worker true: the worker draws for an fp32 per-token diffusion head on the CPU, "
                        f"and this model has none there (device {engine.device})")
    batcher = Batcher(assistant, max_rows=limits.max_batch, gather_s=limits.batch_window_s, thread=False,
                      max_waiting=limits.max_waiting)
    app = create_app(assistant, api_key=api_key, limits=limits, model_name=model_name, batcher=batcher)
    check_address(host, port)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5))
    http = threading.Thread(target=server.run, name="uvicorn", daemon=True)

    def stop(*_: Any) -> None:
        # the batcher first, so that a request in flight gets its 503 while its connection is
        # open, then uvicorn, which stops accepting and closes what is still open after a few
        # seconds. stop() takes locks the interrupted main thread may hold: it runs on a thread
        server.should_exit = True
        threading.Thread(target=batcher.stop, name="unimodal-stop", daemon=True).start()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    if head_worker:  # forked now, while this process has no other thread
        worker = assistant.start_head_worker()
        log.info("the diffusion head (%s) draws, and finished replies' media decode, in a worker process beside the other rows' steps",
                 ", ".join(worker.names))
    try:
        http.start()
        while not server.started:
            if not http.is_alive():  # uvicorn logged why
                raise UserError(f"the server could not start on {host}:{port} (is the address in use, or not this machine's?)")
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]  # --port 0: the one the system chose
        shown = f"[{host}]" if ":" in host else host  # an IPv6 address, as a URL writes it
        log.info("serving %s on http://%s:%d (POST /v1/chat/completions, GET /v1/models[/ID], GET /health)",
                 model_name or assistant.name, shown, port)
        batcher.run()
        http.join()
    finally:
        engine.close_worker()


def check_address(host: str, port: int) -> None:
    """An address in use (or not this machine's) in one line, before uvicorn logs its own error
    (and, from the command line, before the model loads)."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a port number (0-65535)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except socket.gaierror as err:
            raise UserError(f"cannot listen on {host}:{port}: --host is not an address or a name that resolves ({err.strerror})") from None
        except OSError as err:
            why = {errno.EADDRINUSE: "is another server on that port? choose another --port",
                   errno.EADDRNOTAVAIL: "--host is not an address of this machine",
                   errno.EACCES: "ports below 1024 need privileges; choose another --port"}.get(err.errno, "check --host and --port")
            raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err} ({why})") from None
