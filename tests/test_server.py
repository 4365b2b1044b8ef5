"""The OpenAI-compatible server, started on loopback and spoken to over real HTTP (urllib)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile
import uvicorn
from inference_helpers import CharTokenizer, family_model, media_assistant, text_assistant
from PIL import Image

from unimodal.inference.server import APIError, ServerLimits, create_app

KEY = "test-key"
LIMITS = ServerLimits(max_request_bytes=100_000, max_seconds=60, max_new_tokens=32, max_n=2)


@contextlib.contextmanager
def running(app):
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def assistant():
    return media_assistant()


@pytest.fixture(scope="module")
def url(assistant):
    with running(create_app(assistant, api_key=KEY, limits=LIMITS, model_name="tiny")) as base:
        yield base


def call(url: str, path: str, body=None, key: str | None = KEY, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url + path, data=data, method="POST" if data is not None else "GET")
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def chat(url: str, messages, **extra) -> tuple[int, dict]:
    return call(url, "/v1/chat/completions", {"model": "tiny", "messages": messages, **extra})


def png_url(seed: int = 0) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wav_b64() -> str:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.random.default_rng(0).uniform(-1, 1, 800).astype(np.float32), 8000, format="WAV")
    return base64.b64encode(buffer.getvalue()).decode()


def test_health_models_and_the_bearer_token(url):
    assert call(url, "/health", key=None) == (200, {"status": "ok", "model": "tiny"})
    status, body = call(url, "/v1/models", key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert call(url, "/v1/models", key="wrong")[0] == 401
    status, body = call(url, "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["tiny"]
    assert call(url, "/v1/models/tiny") == (200, body["data"][0])  # the SDK's client.models.retrieve("tiny")
    status, body = call(url, "/v1/models/gpt-4o")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert call(url, "/v1/models/tiny", key=None)[0] == 401


def test_a_key_read_with_its_trailing_newline_still_matches(assistant):
    """HTTP strips a header's surrounding whitespace, so a key read with its file's trailing
    newline ("key\n") would otherwise answer every request with 401."""
    with running(create_app(assistant, api_key=KEY + "\n", limits=LIMITS, model_name="tiny")) as base:
        assert call(base, "/v1/models")[0] == 200


def test_text_completion_and_its_stream_agree(url):
    messages = [{"role": "user", "content": "hello"}]
    status, body = chat(url, messages, temperature=0, max_tokens=10, n=2)
    assert status == 200 and body["object"] == "chat.completion" and len(body["choices"]) == 2
    text = body["choices"][0]["message"]["content"]
    assert isinstance(text, str) and body["choices"][1]["message"]["content"] == text
    assert body["usage"]["completion_tokens"] <= 20 and body["choices"][0]["finish_reason"] in ("stop", "length")
    request = urllib.request.Request(
        url + "/v1/chat/completions", method="POST",
        data=json.dumps({"messages": messages, "temperature": 0, "max_tokens": 10, "stream": True}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1]) == text
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-1]["usage"]["completion_tokens"] > 0


def test_media_in_and_out_as_base64(url):
    content = [
        {"type": "text", "text": "look and listen"},
        {"type": "image_url", "image_url": {"url": png_url()}},
        {"type": "input_audio", "input_audio": {"data": wav_b64(), "format": "wav"}},
    ]
    status, body = chat(url, [{"role": "user", "content": content}], start_with="image", max_media=1, seed=0, max_tokens=12)
    assert status == 200, body
    parts = body["choices"][0]["message"]["content"]
    assert parts[0]["type"] == "image_url"
    header, data = parts[0]["image_url"]["url"].split(",", 1)
    assert header == "data:image/png;base64" and Image.open(io.BytesIO(base64.b64decode(data))).size == (8, 8)
    # the reply goes back into the history as it came
    history = [{"role": "user", "content": content}, body["choices"][0]["message"], {"role": "user", "content": "now speak"}]
    status, body = chat(url, history, start_with="audio", max_media=1, seed=0, max_tokens=12)
    assert status == 200, body
    audio = body["choices"][0]["message"]["content"][0]
    assert audio["type"] == "input_audio" and audio["input_audio"]["format"] == "wav"
    wave, rate = soundfile.read(io.BytesIO(base64.b64decode(audio["input_audio"]["data"])))
    assert rate == 8000 and len(wave) == 4 * 80


@pytest.mark.parametrize(
    ("extra", "status", "needle"),
    [
        ({"max_tokens": 1000}, 400, "more than this server allows (32)"),
        ({"max_tokens": 2, "max_completion_tokens": 1000}, 400, "max_completion_tokens=1000 is more than this server allows (32)"),
        ({"n": 5}, 400, "n must be an integer in [1, 2]"),
        ({"model": "gpt-4"}, 404, "does not exist here"),
        ({"temperature": "hot"}, 400, "temperature must be a number"),
        ({"top_p": 3.0}, 400, "top_p must be in [0, 1]"),
        ({"tools": [{"type": "function"}]}, 400, "tools: this server does not support tool calling"),
        # fields that would change the answer are refused, a typo is not ignored
        ({"logit_bias": {"264": -100}}, 400, "logit_bias: this server does not support logit biases"),
        ({"frequency_penalty": 2}, 400, "frequency_penalty: this server does not support frequency penalties"),
        ({"tool_choice": "required"}, 400, 'tool_choice="required": this server takes only "none" or "auto"'),
        ({"reasoning_effort": "high"}, 400, 'reasoning_effort="high": this server takes only "none"'),
        ({"start_with": "image", "num_beams": 2}, 400, "beam search writes text only; a reply that starts with image needs num_beams=1"),
        ({"temprature": 1.5, "text": {}}, 400, "unknown fields temprature, text; this server reads audio, image, max_completion_tokens"),
        ({"max_completion_tokens": 3, "max_tokens": "x"}, 400, "max_tokens must be a positive integer"),
        ({"stream_options": {"include_usage": True}}, 400, 'stream_options must be {"include_usage": true|false}, with stream=true'),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}, 400, "data: URL"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "path": "/etc/passwd"}]}]}, 400, "not supported"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role 'robot'"),
        ({"messages": []}, 400, "non-empty list"),
        ({"image": {"steps": "x"}}, 400, "image: sampling settings: steps must be an integer or null, got 'x'"),
        ({"image": {"temperature": None}}, 400, "temperature must be a number, got None"),
        ({"temperature": float("nan")}, 400, "NaN is not a JSON number"),
        ({"image": {"cfg_scale": 1000}}, 400, "image.cfg_scale=1000 is more than this server allows (4,"),
        ({"num_beams": 100}, 400, "text.num_beams=100 is more than this server allows (4,"),
        ({"max_media": 1000}, 400, "max_media=1000 is more than this server allows"),
        # values that used to fail deep in generation, taking every request of their batch along
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": "abc"}]}]}, 400, "input_audio must be an object"),
        ({"temperature": 1e-40}, 400, "temperature must be 0 (greedy) or in [0.0001, 10000]"),
        ({"audio": {"temperature": 1e300}}, 400, "temperature must be 0 (greedy) or in [0.0001, 10000]"),
        ({"temperature": 1, "repetition_penalty": 1e-300}, 400, "repetition_penalty must be in [0.0001, 10000] (1 is none)"),
        ({"seed": 2**70}, 400, "seed must be a 64-bit integer"),
        ({"messages": [{"role": "user", "content": "a\ud800b"}]}, 400, "a string holds a lone surrogate (\\ud800), which is not valid Unicode"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_media": 0, "start_with": "image"}, 400, "must start with image"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "mp4"}}]}]},
         400, "input_audio format 'mp4' is not one of wav, flac, mp3, ogg"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": base64.b64encode(b"\x89PNG....").decode(), "format": "wav"}}]}]},
         400, "input_audio of format wav is not a .wav file (it starts with b'\\x89PNG....')"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]},
         400, "image data URL of type image/png is not a .png file (it starts with b'hello')"),
        ({"stream": "false"}, 400, "stream must be true or false"),
        ({"n": True}, 400, "n must be an integer"),
        # each step looks for every stop string at the reply's end: a megabyte of them froze the worker
        ({"stop": ["x" * 1001]}, 400, "stop takes at most 16 strings of at most 1000 characters each"),
    ],
)
def test_bad_requests_get_clear_4xx(url, extra, status, needle):
    got, body = call(url, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **extra})
    assert got == status and needle in body["error"]["message"], body


def test_n_above_max_batch_is_refused_since_a_requests_replies_are_generated_together():
    from unimodal.inference.server import parse_request

    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}).encode()
    with pytest.raises(APIError, match=r"n must be an integer in \[1, 1\] \(--max_batch\)"):
        parse_request(body, "tiny", ServerLimits(max_n=8, max_batch=1))
    assert parse_request(body, "tiny", ServerLimits(max_n=8, max_batch=2)).n == 2


def test_a_text_only_model_refuses_audio_and_image_replies_in_one_line():
    with running(create_app(text_assistant(), limits=LIMITS, model_name="text")) as base:
        for extra, medium in (({"modalities": ["text", "audio"]}, "audio"), ({"audio": {"voice": "alloy"}}, "audio"),
                              ({"start_with": "image"}, "image")):
            status, body = call(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **extra})
            assert status == 400 and body["error"]["message"] == f"this model cannot write {medium}: its replies hold text only", body
        for medium, settings in (("image", {"steps": 10}), ("audio", {"top_k": 5})):
            status, body = call(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], medium: settings})
            message = f"{medium} settings were given, but this model's replies hold text only"
            assert status == 400 and body["error"]["message"] == message, body
        status, _ = call(base, "/v1/chat/completions", {"messages": [{"role": "developer", "content": "be brief"},
                                                                     {"role": "user", "content": "hi"}], "max_tokens": 2})
        assert status == 200


def test_modalities_leave_media_out_of_the_reply():
    """OpenAI's ``modalities`` names the output types: ["text"] gets a text reply even from a model
    that would draw or speak, ["text", "audio"] no picture. It had changed only message.audio."""
    from inference_helpers import bias_tokens

    eager = media_assistant()
    layout = eager.model.layout
    bias_tokens(eager.model, {layout.special_id("<|boi|>"): 30.0, layout.special_id("<|boa|>"): 29.0})
    ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "temperature": 0}

    def kinds(body: dict) -> set[str]:
        content = body["choices"][0]["message"]["content"]
        return {"text"} if isinstance(content, str) else {part["type"] for part in content or []}

    with running(create_app(eager, limits=LIMITS, model_name="tiny")) as base:
        status, free = call(base, "/v1/chat/completions", ask)
        assert status == 200 and "image_url" in kinds(free)  # left alone, it draws first
        status, text = call(base, "/v1/chat/completions", {**ask, "modalities": ["text"]})
        assert status == 200 and kinds(text) == {"text"}
        status, spoken = call(base, "/v1/chat/completions", {**ask, "modalities": ["text", "audio"]})
        assert status == 200 and "image_url" not in kinds(spoken) and spoken["choices"][0]["message"]["audio"] is not None
        for extra, refusal in (({"modalities": ["text"], "start_with": "audio"}, "start_with is 'audio', which modalities leave out"),
                               ({"modalities": ["text"], "audio": {"format": "wav"}}, "an audio object asks for audio output"),
                               ({"modalities": ["audio"]}, "modalities must be a list of text, image, audio that holds text"),
                               ({"modalities": ["text", "audio"], "image": {"steps": 3}}, "image settings were given, but modalities leave image out")):
            status, body = call(base, "/v1/chat/completions", {**ask, **extra})
            assert status == 400 and refusal in body["error"]["message"], body


def test_a_stream_sends_media_where_the_reply_has_them():
    """Pictures and clips come as they are written, between the text around them: the stream of a
    seeded reply rebuilds the same ordered parts as the reply sent whole (media had all come at
    the end). With audio output asked for, the first clip is delta.audio, in its place."""
    from inference_helpers import bias_tokens

    mixed = media_assistant()
    layout = mixed.model.layout
    bias_tokens(mixed.model, {layout.special_id("<|boi|>"): 4.0, layout.special_id("<|boa|>"): 4.0})

    def events(base: str, body: dict) -> list[dict]:
        request = urllib.request.Request(base + "/v1/chat/completions", method="POST", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            lines = [line[len("data: "):] for line in response.read().decode().splitlines() if line.startswith("data: ")]
        return [json.loads(line)["choices"][0]["delta"] for line in lines[:-1] if json.loads(line)["choices"]]

    def merged(pieces: list[tuple[str, object]]) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        for kind, value in pieces:
            if kind == "text" and out and out[-1][0] == "text":
                out[-1] = ("text", out[-1][1] + value)
            elif not (kind == "text" and not value):
                out.append((kind, value))
        return out

    def media_key(part: dict) -> tuple[str, object]:
        if part["type"] == "text":
            return "text", part["text"]
        return part["type"], (part.get("image_url") or part.get("input_audio"))["url" if part["type"] == "image_url" else "data"]

    interleaved = spoken_seeds = 0
    with running(create_app(mixed, limits=LIMITS, model_name="tiny")) as base:
        for seed in range(6):
            ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 32, "max_media": 3, "seed": seed, "temperature": 1}
            status, whole = call(base, "/v1/chat/completions", ask, key=None)
            assert status == 200, whole
            content = whole["choices"][0]["message"]["content"]
            want = merged([("text", content)] if isinstance(content, str) else [media_key(p) for p in content])
            streamed = []
            for delta in events(base, {**ask, "stream": True}):
                piece = delta.get("content")
                streamed += [("text", piece)] if isinstance(piece, str) else [media_key(p) for p in piece or []]
            assert merged(streamed) == want, seed
            kinds = [kind for kind, _ in want]
            interleaved += any("text" in kinds[:i] and "text" in kinds[i + 1:] for i, k in enumerate(kinds) if k != "text")
            if kinds.count("input_audio") and isinstance(content, list):  # the first clip as delta.audio, in its place
                spoken_seeds += 1
                deltas = events(base, {**ask, "stream": True, "modalities": ["text", "audio", "image"]})
                assert sum(bool(d.get("audio", {}).get("data")) for d in deltas) == 1
                first = next(d for d in deltas if d.get("audio", {}).get("data"))  # and in content, in its place
                assert first["content"][0]["type"] == "input_audio" and deltas[-1]["audio"]["id"] == first["audio"]["id"]
        assert interleaved and spoken_seeds, "no seed gave a reply with media between text, or with a clip: the test shows nothing"


def test_unknown_paths_and_methods_get_the_error_shape_and_null_n_is_one(url):
    status, body = call(url, "/v1/nothing")
    assert status == 404 and body["error"]["code"] == "not_found" and "/v1/nothing" in body["error"]["message"]
    status, body = call(url, "/v1/chat/completions")  # a GET
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    status, body = chat(url, [{"role": "user", "content": "hi"}], n=None, max_tokens=2)
    assert status == 200 and len(body["choices"]) == 1


def test_a_stream_refused_once_its_prompt_is_made_gets_its_4xx_before_any_event(url):
    """Prompts are made by the model's worker; a stream waits for it before sending its 200."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "word " * 400}], "stream": True}
    status, answer = call(url, "/v1/chat/completions", body)
    assert status == 400 and "the last message makes a prompt of" in answer["error"]["message"]


def test_a_request_that_fails_its_batch_fails_alone(assistant, caplog):
    """A failure no validation foresaw (here, one planted in generation) is retried one job at a
    time: only its own request gets the error, the others their usual answers."""
    from unimodal.inference.batcher import Batcher
    from unimodal.inference.server import Call, _job, _result

    answer = assistant.answer
    boom = assistant.prompt([{"role": "user", "content": "boom"}])[0].ids.tolist()

    def fragile(prompts, settings, **kwargs):
        if any(prompt.ids.tolist() == boom for prompt, _ in prompts):
            raise RuntimeError("planted failure")
        return answer(prompts, settings, **kwargs)

    batcher = Batcher(assistant, thread=False)
    calls = [Call([{"role": "user", "content": text}], {"max_new_tokens": 6, "temperature": 0}, 1, False, None) for text in ("hi", "boom", "hey")]
    jobs = [_job(c, batcher, LIMITS) for c in calls]
    alone = []
    for c in (calls[0], calls[2]):
        job = _job(c, batcher, LIMITS)
        batcher._run([job])
        alone.append(job.future.result()[0].text)
    assistant.answer = fragile
    try:
        batcher._run(jobs)
    finally:
        del assistant.answer
    assert [jobs[0].future.result()[0].text, jobs[2].future.result()[0].text] == alone
    with pytest.raises(APIError, match="generation failed: RuntimeError: planted failure") as failed:
        _result(jobs[1].future, jobs[1], batcher, LIMITS)
    assert failed.value.status == 500
    assert "a batch of 3 requests failed (RuntimeError: planted failure); running them one at a time" in caplog.text


def test_a_request_rerun_alone_after_its_batch_failed_keeps_its_deadline(assistant):
    """The rerun one at a time has what the failed batch left of each request's ``timeout_s``,
    not the whole of it again: a request could otherwise run for about twice its limit."""
    from unimodal.inference.batcher import Batcher
    from unimodal.inference.server import Call, _job, _result

    answer, limits = assistant.answer, []

    def slow_then_fragile(prompts, settings, **kwargs):
        limits.append([s.timeout_s for s in settings])
        if len(prompts) > 1:
            time.sleep(0.6)
            raise RuntimeError("planted failure")
        return answer(prompts, settings, **kwargs)

    batcher = Batcher(assistant, thread=False)
    calls = [Call([{"role": "user", "content": text}], {"max_new_tokens": 4, "temperature": 0, "timeout_s": timeout}, 1, False, None)
             for text, timeout in (("hi", 0.5), ("hey", 30))]
    jobs = [_job(c, batcher, LIMITS) for c in calls]
    assistant.answer = slow_then_fragile
    try:
        batcher._run(jobs)
    finally:
        del assistant.answer
    with pytest.raises(APIError) as late:
        _result(jobs[0].future, jobs[0], batcher, LIMITS)
    assert late.value.status == 408
    assert jobs[1].future.result()[0].text
    assert len(limits) == 2 and 0.45 < limits[0][0] <= 0.5 and 29.5 < limits[0][1] <= 30 and 28 < limits[1][0] < 29.5


def test_a_prompt_that_takes_the_requests_whole_time_limit_is_a_408_before_it_generates(assistant):
    """Decoding a request's media runs on the model's one thread: it counts against the request's
    ``timeout_s`` (a request of many large pictures asked for 1 s and was answered 200 after 5)."""
    from unimodal.inference.batcher import Batcher
    from unimodal.inference.server import Call, _job, _result

    prompt, generated = assistant.prompt, []

    def slow_prompt(*args, **kwargs):
        time.sleep(0.3)
        return prompt(*args, **kwargs)

    def answer(prompts, *args, **kwargs):
        generated.append(len(prompts))
        return type(assistant).answer(assistant, prompts, *args, **kwargs)

    batcher = Batcher(assistant, thread=False)
    calls = [Call([{"role": "user", "content": "hi"}], {"max_new_tokens": 4, "temperature": 0, "timeout_s": timeout}, 1, False, None)
             for timeout in (0.2, 30)]
    jobs = [_job(c, batcher, LIMITS) for c in calls]
    assistant.prompt, assistant.answer = slow_prompt, answer
    try:
        batcher._run(jobs)
    finally:
        del assistant.prompt, assistant.answer
    with pytest.raises(APIError, match="reading its media counts") as late:
        _result(jobs[0].future, jobs[0], batcher, LIMITS)
    assert late.value.status == 408 and batcher.stats["timeout"] == 1
    assert generated == [1] and jobs[1].future.result()[0].text  # only the other one generated


def test_waiting_requests_are_bounded_and_one_whose_caller_left_takes_no_row(assistant):
    """Each waiting request holds its body: past ``max_waiting`` a request is a 429 at once. A
    request cancelled while it waits is skipped when a batch is gathered."""
    from unimodal.inference.batcher import Batcher, Busy
    from unimodal.inference.server import Call, _job, _result

    batcher = Batcher(assistant, thread=False, max_waiting=2, gather_s=0.0)
    hi = Call([{"role": "user", "content": "hi"}], {"max_new_tokens": 2}, 1, False, None)
    jobs = [batcher.submit(_job(hi, batcher, LIMITS)) for _ in range(3)]
    with pytest.raises(Busy, match="2 requests are waiting for the model already"):
        jobs[2].future.result(timeout=0)
    with pytest.raises(APIError, match="the server is busy: 2 requests are waiting") as busy:
        _result(jobs[2].future, jobs[2], batcher, LIMITS)
    assert busy.value.status == 429
    assert jobs[0].future.cancel()  # its client left while it waited
    assert batcher._gather() == [jobs[1]]


def test_the_pixels_of_a_prompts_images_are_bounded_before_any_is_decoded(assistant, monkeypatch):
    """A 4096x4096 PNG of one colour is 60 kB on the wire and about a second to decode."""
    from unimodal.inference import chat as chat_module
    from unimodal.inference.chat import ChatError

    decoded = []
    monkeypatch.setattr(chat_module, "_decode", lambda *args, **kwargs: decoded.append(1))
    monkeypatch.setattr(chat_module, "MAX_PROMPT_PIXELS", 2 * 8 * 8)
    picture = {"type": "image_url", "image_url": {"url": png_url()}}  # 8 x 8
    with pytest.raises(ChatError, match=r"the images declare 192 pixels in all, over the 128 one prompt may have"):
        assistant.prompt([{"role": "user", "content": [picture] * 3}])
    assert not decoded


def test_a_client_that_leaves_while_its_request_waits_frees_it_at_once(assistant):
    import asyncio

    from unimodal.inference.batcher import Batcher
    from unimodal.inference.server import Call, _job, _wait

    class Gone:
        async def is_disconnected(self) -> bool:
            return True

    batcher = Batcher(assistant, thread=False)  # never runs: the request waits for good
    job = batcher.submit(_job(Call([{"role": "user", "content": "hi"}], {}, 1, False, None), batcher, LIMITS))
    with pytest.raises(APIError, match="closed the connection while the request waited"):
        asyncio.run(_wait(job, batcher, LIMITS, Gone()))
    assert job.future.cancelled() and job.cancel.is_set() and job.messages == []


def test_beam_search_by_the_models_own_default_runs_in_a_batch_of_its_own(caplog):
    """A model whose default is beam search (MIO's is 5): its requests are never gathered with
    sampled ones, which the engine could not run together."""
    from unimodal.inference.batcher import Batcher, Job

    batcher = Batcher(media_assistant(settings={"num_beams": 2}), thread=False, gather_s=0.5)
    hi = [{"role": "user", "content": "hi"}]
    jobs = [batcher.submit(Job(hi, settings, timeout_s=60, wait_until=time.monotonic() + 60))
            for settings in ({"max_new_tokens": 4}, {"max_new_tokens": 4, "num_beams": 1}, {"max_new_tokens": 4, "num_beams": 1, "temperature": 0.5})]
    assert batcher._gather() == jobs[:1] and batcher._gather() == jobs[1:]
    for batch in (jobs[:1], jobs[1:]):
        batcher._run(batch)
    assert all(job.future.result() for job in jobs) and "failed" not in caplog.text


def test_a_reply_its_settings_leave_no_room_for_is_refused_before_the_batch(assistant, caplog):
    """``start_with`` with ``max_media: 0`` is the client's mistake: a 400 for that request alone,
    found while its prompt is made, so the batch is neither failed nor rerun one at a time."""
    from unimodal.inference.batcher import Batcher
    from unimodal.inference.server import Call, _job, _result

    batcher = Batcher(assistant, thread=False)
    settings = {"max_new_tokens": 6, "temperature": 0}
    calls = [Call([{"role": "user", "content": "hi"}], settings, 1, False, None),
             Call([{"role": "user", "content": "x"}], {**settings, "max_media": 0}, 1, False, "image"),
             Call([{"role": "user", "content": "hey"}], settings, 1, False, None),
             Call([{"role": "user", "content": "hi"}], {**settings, "seed": 2**63 - 1}, 3, False, None)]  # seeds s, s+1, s+2
    jobs = [_job(c, batcher, LIMITS) for c in calls]
    with caplog.at_level("INFO"):
        batcher._run(jobs)
    with pytest.raises(APIError, match="the reply must start with image, which its settings leave no room for") as refused:
        _result(jobs[1].future, jobs[1], batcher, LIMITS)
    assert refused.value.status == 400
    with pytest.raises(APIError, match="seed 9223372036854775807 leaves no 64-bit seed for 3 replies") as refused:
        _result(jobs[3].future, jobs[3], batcher, LIMITS)
    assert refused.value.status == 400
    assert all(job.future.result() for job in (jobs[0], jobs[2]))
    assert batcher.stats["batches"] == 1 and "failed" not in caplog.text


def test_a_huge_diffusion_steps_setting_is_refused_naming_its_cap():
    """Issue 14's first probe, `image: {"steps": 10000000}`: a 400 naming the cap, 4x the model's own steps."""
    from unimodal.inference.server import check_caps, parse_request, sampling_caps
    from unimodal.models.generation import GenerationSettings

    caps = sampling_caps(media_assistant(settings=GenerationSettings(image={"steps": 50})))
    body = {"messages": [{"role": "user", "content": "hi"}], "image": {"steps": 10_000_000}}
    call = parse_request(json.dumps(body).encode(), "tiny", LIMITS)
    with pytest.raises(APIError, match=r"image\.steps=10000000 is more than this server allows \(200, 4x") as refused:
        check_caps(call.settings, caps)
    assert refused.value.status == 400


def test_diffusion_steps_are_capped_at_the_schedules_timesteps():
    """4x a model's 400 steps would pass 1,600 to a sampler whose schedule has 1,000 timesteps,
    which fails inside the batch; the request gets a 400 instead."""
    from unimodal.data.processor import Processor
    from unimodal.inference.chat import Assistant
    from unimodal.inference.server import check_caps, sampling_caps
    from unimodal.models.generation import GenerationSettings

    model = family_model("orthus")
    assistant = Assistant(model, Processor(CharTokenizer(), model.layout), settings=GenerationSettings(image={"steps": 400}))
    assert sampling_caps(assistant)["image.steps"] == 1000
    with pytest.raises(APIError, match=r"image\.steps=1200 is more than this server allows \(1000, .*schedule's timesteps"):
        check_caps({"image": {"steps": 1200}}, sampling_caps(assistant))


def test_size_and_duration_limits(url, assistant):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 200_000}]}).encode()
    status, body = call(url, "/v1/chat/completions", raw=big)
    assert status == 413 and "100000 bytes" in body["error"]["message"]
    status, body = call(url, "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    nested = b'{"messages": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"  # within the size limit, past the parser's depth
    status, body = call(url, "/v1/chat/completions", raw=nested)
    assert status == 400 and body["error"]["message"] == "the body is not valid JSON: arrays or objects nested too deeply"
    for raw, says in ((b'{"messages": [], "seed": 1' + b"0" * 5000 + b"}", "an integer has more than 4300 digits"),
                      (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "a string holds a lone surrogate (\\ud800), which is not valid Unicode"),
                      (b'{"messages": [], "temperature": 1e400}', "1e400 is beyond the range of a number")):
        status, body = call(url, "/v1/chat/completions", raw=raw)
        assert status == 400 and body["error"]["message"] == f"the body is not valid JSON: {says}", body
    status, body = call(url, "/v1/chat/completions", raw=b"\xff\xfe{")  # json.loads guessed UTF-16 from these bytes
    assert status == 400 and body["error"]["message"] == "the body is not UTF-8 (byte 0); JSON bodies are UTF-8"
    long_system = [{"role": "system", "content": "rule " * 400}, {"role": "user", "content": "hi"}]
    status, body = chat(url, long_system)
    assert status == 400 and "the system prompt and the last message make a prompt of" in body["error"]["message"]
    assert "lower max_tokens" in body["error"]["message"]  # the request's name for the engine's max_new_tokens
    status, body = chat(url, [{"role": "user", "content": "hi"}], max_tokens=True)
    assert status == 400 and body["error"]["message"] == "max_tokens must be a positive integer"
    status, body = chat(url, [{"role": "user", "content": "hi"}], max_tokens=30, timeout_s=1e-4)
    assert status == 408 and "limit of 0.0001 s" in body["error"]["message"]
    status, body = chat(url, [{"role": "user", "content": "hi"}], timeout_s=61)
    assert status == 400 and "timeout_s must be in (0, 60]" in body["error"]["message"]


def test_shutdown_cancels_the_running_generation(assistant):
    """SIGTERM's path: uvicorn runs the lifespan's shutdown, which stops the batcher; a running
    generation sees it at its next step and its request gets a 503, so the model is freed."""
    from unimodal.inference.batcher import Batcher
    from unimodal.inference.server import Call, _job, _result

    app = create_app(assistant, limits=LIMITS, model_name="tiny")
    with running(app):
        assert not app.state.batcher.stopping.is_set()
    assert app.state.batcher.stopping.is_set()

    batcher = Batcher(slowed_assistant(0.02))  # text only, never ending early: about 5 s of generation
    started = threading.Event()
    call = Call([{"role": "user", "content": "hi"}], {"max_new_tokens": 10_000, "max_media": 0, "seed": 0}, 1, False, None)
    job = batcher.submit(_job(call, batcher, ServerLimits(max_new_tokens=10_000), on_text=lambda choice, text: started.set()))
    assert started.wait(60)
    batcher.stop()
    with pytest.raises(APIError, match="shutting down") as stopped:
        _result(job.future, job, batcher, LIMITS)
    assert stopped.value.status == 503 and batcher.stats["cancelled"] == 1
    late = batcher.submit(_job(call, batcher, LIMITS))
    with pytest.raises(APIError, match="shutting down"):
        _result(late.future, late, batcher, LIMITS)
    with pytest.raises(APIError, match="shutting down"):  # a stream waits for this one first
        _result(late.accepted, late, batcher, LIMITS)


def test_settings_out_of_range_are_refused_before_the_request_waits_for_the_model(assistant):
    """The worker makes each request's settings when its batch starts; a request whose settings
    cannot be made is a 400 at once, not after the batches ahead of it (or a 429 once it waited)."""
    from unimodal.inference.batcher import Batcher
    from unimodal.inference.server import Call, _job

    batcher = Batcher(assistant, thread=False)  # busy for good: nothing it is given ever starts
    for settings, needle in (({"temperature": -1}, "temperature must be 0"), ({"max_new_tokens": 0}, "max_tokens must be")):
        with pytest.raises(APIError, match=needle) as refused:
            _job(Call([{"role": "user", "content": "hi"}], settings, 1, False, None), batcher, LIMITS)
        assert refused.value.status == 400


def test_shutdown_while_a_batch_is_gathered_cancels_that_batch(assistant):
    """stop() that comes while the worker waits for more requests to join a batch: the batch it
    gathered so far is cancelled too, not generated in full after the server has stopped."""
    from unimodal.inference.batcher import Batcher
    from unimodal.inference.server import Call, _job, _result

    batcher = Batcher(assistant, thread=False, gather_s=30)
    call = Call([{"role": "user", "content": "hi"}], {"max_new_tokens": 200, "max_media": 0, "seed": 0}, 1, False, None)
    job = batcher.submit(_job(call, batcher, LIMITS))
    timer = threading.Timer(0.2, batcher.stop)
    timer.start()
    batcher.run()  # gathers the job, waits for company, sees stop(), returns
    timer.join()
    with pytest.raises(APIError, match="shutting down"):
        _result(job.future, job, batcher, LIMITS)
    assert batcher.stats["cancelled"] == 1


def test_sigterm_answers_the_request_in_flight_with_503_and_the_process_exits(tmp_path):
    """``unimodal serve``'s own signal handling, end to end: the batcher stops first, so the
    running request's connection is still open for its 503 (uvicorn alone waited for it, then
    cut it with a plain 500)."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = tmp_path / "serve.py"
    script.write_text(
        f"import sys\nsys.path[:0] = [{str(Path(__file__).parent)!r}]\n"
        "from test_server import slowed_assistant\n"
        "from unimodal.inference.server import ServerLimits, serve\n"
        f"serve(slowed_assistant(0.02), port={port}, limits=ServerLimits(max_new_tokens=10_000), model_name='tiny')\n"
    )
    server = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not answers_health(base):
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
            time.sleep(0.1)
        answer: list = []
        long = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000, "max_media": 0, "seed": 0}  # minutes of text
        sender = threading.Thread(target=lambda: answer.append(call(base, "/v1/chat/completions", long, key=None)))
        sender.start()
        time.sleep(1.0)
        os.kill(server.pid, signal.SIGTERM)
        sender.join(30)
        assert answer and answer[0][0] == 503 and answer[0][1]["error"]["code"] == "shutting_down", answer
        assert server.wait(30) == 0
    finally:
        server.kill()


def test_port_0_logs_the_port_the_system_chose(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "serve.py"
    script.write_text(
        f"import logging, sys\nsys.path[:0] = [{str(Path(__file__).parent)!r}]\nlogging.basicConfig(level=logging.INFO)\n"
        "from test_server import slowed_assistant\n"
        "from unimodal.inference.server import serve\n"
        "serve(slowed_assistant(0.0), port=0, model_name='tiny')\n"
    )
    server = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    try:
        line = next(line for line in server.stderr if "serving tiny on" in line)
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        assert port != 0 and answers_health(f"http://127.0.0.1:{port}")
        os.kill(server.pid, signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        server.kill()


def answers_health(base: str) -> bool:
    try:
        return call(base, "/health", key=None)[0] == 200
    except OSError:  # not listening yet
        return False


def test_the_openai_sdk_does_not_send_a_timed_out_generation_again(assistant):
    """OpenAI's SDKs retry a 408 or a 5xx twice by default; a generation past its limit would
    only run out of time again, three times over, so its 408 says ``x-should-retry: false``."""
    from unimodal.inference.batcher import Batcher

    openai = pytest.importorskip("openai")
    batcher = Batcher(assistant)
    with running(create_app(assistant, api_key=KEY, limits=LIMITS, model_name="tiny", batcher=batcher)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY)  # the default retries
        with pytest.raises(openai.APIStatusError) as late:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=30,
                                           extra_body={"timeout_s": 1e-4})
    assert late.value.status_code == 408 and late.value.response.headers["x-should-retry"] == "false"
    assert batcher.stats["timeout"] == 1  # run once: three times with the SDK's retries


def test_the_openai_sdk_gets_audio_replies_where_it_looks_for_them(url):
    """The official client: ``modalities`` and ``audio={"voice", "format"}`` as OpenAI's audio
    examples send them; the spoken reply is ``message.audio`` (the voice is accepted and
    ignored), usage is counted, and a stream delivers the clip as ``delta.audio``."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    ask = dict(
        model="tiny", messages=[{"role": "user", "content": "say something"}], modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "wav"}, max_tokens=12, extra_body={"start_with": "audio", "max_media": 1, "seed": 0},
    )
    reply = client.chat.completions.create(**ask)
    message = reply.choices[0].message
    assert message.audio is not None and message.audio.id.startswith("audio_") and isinstance(message.audio.transcript, str)
    wave, rate = soundfile.read(io.BytesIO(base64.b64decode(message.audio.data)))
    assert rate == 8000 and len(wave) == 4 * 80
    assert reply.usage.completion_tokens > 0 and reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    raw_message = client.chat.completions.create(**{**ask, "audio": {"voice": "alloy", "format": "pcm16"}}).choices[0].message
    assert len(base64.b64decode(raw_message.audio.data)) == 2 * 4 * 80  # 16-bit samples

    # a spoken reply goes back into the history as it came, in either format; by id alone it cannot
    def prompt_tokens(said: dict) -> int:
        history = ask["messages"] + [said, {"role": "user", "content": "again"}]
        return client.chat.completions.create(**{**ask, "messages": history}).usage.prompt_tokens

    transcript_only = prompt_tokens({"role": "assistant", "content": message.audio.transcript or "-"})
    for said in (message, raw_message):
        assert prompt_tokens(said.model_dump(exclude_none=True)) >= transcript_only + 4  # the clip's 4 codes are in the prompt
    by_id = ask["messages"] + [{"role": "assistant", "content": None, "audio": {"id": message.audio.id}}, {"role": "user", "content": "again"}]
    with pytest.raises(openai.BadRequestError, match="this server keeps no replies"):
        client.chat.completions.create(**{**ask, "messages": by_id})

    chunks = list(client.chat.completions.create(**ask, stream=True))
    audio = [getattr(c.choices[0].delta, "audio", None) for c in chunks if c.choices]
    assert any(a for a in audio) and chunks[-1].choices[0].finish_reason in ("stop", "length")
    # usage as OpenAI streams it when asked: a chunk of its own, no choices; fields that change nothing are taken
    counted = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}, user="u1",
                                                  frequency_penalty=0, logit_bias={}, tool_choice="none"))
    assert counted[-1].choices == [] and counted[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert counted[-2].choices[0].finish_reason == chunks[-1].choices[0].finish_reason and counted[-2].usage is None
    with pytest.raises(openai.BadRequestError, match="audio.format must be one of"):
        client.chat.completions.create(**{**ask, "audio": {"voice": "alloy", "format": "opus"}})


def test_a_reply_of_several_clips_keeps_its_order_and_format_and_goes_back_as_it_came():
    """message.audio takes the first clip; with more media, content keeps every part in order (the
    first clip too), each clip in the asked format. It had left the first clip out of content,
    and a message sent back put it last: [t1, c1, t2, c2] came back as [t1, t2, c2, c1]."""
    from unimodal.inference.chat import ReplyPart
    from unimodal.inference.server import _spoken_reply_as_content, message_fields

    def clip(value: float) -> ReplyPart:
        return ReplyPart("audio", audio=np.full(80, value, dtype=np.float32), sample_rate=8000)

    parts = [ReplyPart("text", text="one "), clip(0.1), ReplyPart("text", text="two "), clip(0.2)]
    fields = message_fields(parts, "flac")
    kinds = [(p["type"], p.get("input_audio", {}).get("format")) for p in fields["content"]]
    assert kinds == [("text", None), ("input_audio", "flac"), ("text", None), ("input_audio", "flac")]
    said = [soundfile.read(io.BytesIO(base64.b64decode(p["input_audio"]["data"])))[0][0] for p in fields["content"][1::2]]
    assert np.allclose(said, [0.1, 0.2], atol=1e-3)
    assert fields["audio"]["data"] == fields["content"][1]["input_audio"]["data"] and fields["audio"]["transcript"] == "one two "
    message = {"role": "assistant", **fields}
    assert _spoken_reply_as_content(message, 1, 8000)["content"] == fields["content"]  # not the first clip again, at the end
    # pcm16 has no header for its rate: message.audio is raw samples, the clips in content stay wav files
    raw = message_fields(parts, "pcm16")
    assert len(base64.b64decode(raw["audio"]["data"])) == 160 and raw["content"][3]["input_audio"]["format"] == "wav"
    # one clip and its text: content is null, and the clip goes back after the transcript
    single = {"role": "assistant", **message_fields(parts[:2], "wav")}
    assert single["content"] is None
    back = _spoken_reply_as_content(single, 1, 8000)["content"]
    assert [p["type"] for p in back] == ["text", "input_audio"] and back[0]["text"] == "one "


def slowed_assistant(step_s: float):
    """A media assistant whose backbone takes ``step_s`` per forward and never ends a reply early
    (end-of-sequence suppressed), so a generation lasts as long as its budget."""
    from inference_helpers import bias_tokens

    slow = media_assistant()
    bias_tokens(slow.model, {slow.processor.tokenizer.eos_id: -1e4})
    layer = slow.model.backbone.model.layers[0]
    forward = layer.forward

    def slowed(*args, **kwargs):
        time.sleep(step_s)
        return forward(*args, **kwargs)

    layer.forward = slowed
    return slow


def together(requests: list[dict], base: str, finished: list[float] | None = None) -> list[tuple[int, dict]]:
    """Send every request at once (one thread each) and return the answers in order; ``finished``
    gets the time each answer came back."""
    answers: list = [None] * len(requests)

    def send(i: int) -> None:
        answers[i] = chat(base, **requests[i])
        if finished is not None:
            finished[i] = time.perf_counter()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return answers


def parts_of(body: dict) -> list:
    """A reply's content comparable across runs: text as is, audio bytes, images as pixel arrays."""
    out = []
    for choice in body["choices"]:
        content = choice["message"]["content"]
        for part in [content] if isinstance(content, str) else content:
            if isinstance(part, str) or part["type"] == "text":
                out.append(part if isinstance(part, str) else part["text"])
            elif part["type"] == "image_url":
                data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                out.append(np.asarray(Image.open(io.BytesIO(data))).astype(int))
            else:
                out.append(part["input_audio"]["data"])
    return out


def test_concurrent_requests_share_a_batch_and_answer_as_they_would_alone(assistant):
    """Mixed requests (text, pictures, speech; greedy and sampled; n=2) sent at once run as one
    engine batch, and each seeded answer equals the one it gets alone."""
    hi = [{"role": "user", "content": "hi there"}]
    requests = [
        dict(messages=hi, temperature=0, max_tokens=12),
        dict(messages=hi, temperature=0.9, seed=3, max_tokens=12, n=2),
        dict(messages=[{"role": "user", "content": "draw"}], start_with="image", max_media=1, seed=5, max_tokens=10),
        dict(messages=[{"role": "user", "content": "speak"}], start_with="audio", max_media=1, seed=7, top_k=5, max_tokens=10),
        dict(messages=[{"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": png_url()}}]}],
             temperature=0.7, seed=11, max_tokens=12),
    ]
    limits = ServerLimits(max_new_tokens=32, max_n=2, batch_window_s=1.0)
    app = create_app(assistant, limits=limits, model_name="tiny")
    with running(app) as base:
        batched = together(requests, base)
        assert app.state.batcher.stats["batches"] == 1 and app.state.batcher.stats["rows"] == 6
        alone = [chat(base, **request) for request in requests]
    for request, (status, body), (status_alone, body_alone) in zip(requests, batched, alone):
        assert status == status_alone == 200, body
        if "seed" in request:
            assert body["unimodal"]["seeds"] == body_alone["unimodal"]["seeds"] == [request["seed"] + k for k in range(request.get("n", 1))]
        for a, b in zip(parts_of(body), parts_of(body_alone), strict=True):
            if isinstance(a, np.ndarray):
                assert np.abs(a - b).max() <= 1  # pixels from float features: batch matmuls may differ in the last bit
            else:
                assert a == b


def test_a_short_request_is_answered_while_the_batchs_longest_reply_goes_on():
    step_s = 0.02
    app = create_app(slowed_assistant(step_s), limits=ServerLimits(max_new_tokens=32, batch_window_s=1.0), model_name="tiny")
    hi = [{"role": "user", "content": "hi"}]
    finished = [0.0, 0.0]
    with running(app) as base:
        (short, _), (long, body) = together([dict(messages=hi, temperature=0, max_tokens=2), dict(messages=hi, temperature=0, max_tokens=30)],
                                            base, finished)
        assert app.state.batcher.stats["batches"] == 1
    assert short == long == 200 and body["usage"]["completion_tokens"] == 30
    assert finished[1] - finished[0] > 20 * step_s  # the long reply still had 28 steps to go


def test_a_request_past_its_deadline_leaves_the_batch_and_the_others_go_on():
    slow = slowed_assistant(0.005)
    limits = ServerLimits(max_new_tokens=32, batch_window_s=1.0)
    app = create_app(slow, limits=limits, model_name="tiny")
    hi = [{"role": "user", "content": "hi"}]
    with running(app) as base:
        (late, late_body), (on_time, body) = together([dict(messages=hi, max_tokens=20, timeout_s=1e-3), dict(messages=hi, temperature=0, max_tokens=20)], base)
        assert app.state.batcher.stats["batches"] == 1
        assert late == 408 and late_body["error"]["code"] == "timeout"
        assert on_time == 200 and body["usage"]["completion_tokens"] == 20
        assert body["choices"][0]["message"]["content"] == chat(base, messages=hi, temperature=0, max_tokens=20)[1]["choices"][0]["message"]["content"]


def test_a_request_kept_waiting_past_max_seconds_gets_its_429_then():
    """Batches of one row, each generating for up to max_seconds: A from 0 to 4 s, B (sent at
    0.5 s) from 4 to 8 s. C, sent at 1 s, has waited max_seconds at 5 s and is answered 429 then,
    not when B's batch ends."""
    limits = ServerLimits(max_new_tokens=10_000, max_seconds=4.0, max_batch=1)
    app = create_app(slowed_assistant(0.02), limits=limits, model_name="tiny")
    long = dict(messages=[{"role": "user", "content": "hi"}], max_tokens=10_000, max_media=0, seed=0)
    answers: list = [None] * 3
    finished = [0.0] * 3

    def send(i: int) -> None:
        time.sleep(0.5 * i)
        answers[i] = chat(base, **long)
        finished[i] = time.perf_counter()

    with running(app) as base:
        started = time.perf_counter()
        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert [status for status, _ in answers] == [408, 408, 429], answers
    assert "the server is busy: the request waited" in answers[2][1]["error"]["message"]
    assert finished[2] - started < 7.0  # B's batch ends at 8 s


def text_delta(line: bytes) -> str:
    if not line.startswith(b"data: {"):
        return ""
    return json.loads(line[len(b"data: "):])["choices"][0]["delta"].get("content", "")


def test_a_client_that_disconnects_from_a_stream_cancels_its_generation():
    import http.client

    slow = slowed_assistant(0.02)
    app = create_app(slow, limits=ServerLimits(max_new_tokens=200), model_name="tiny")
    with running(app) as base:
        host, port = base.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "max_media": 0, "seed": 0, "stream": True}  # ~4 s of text
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        while True:  # the generation is running once text arrives
            line = response.readline()
            assert line, "the stream ended before any text"
            if text_delta(line):
                break
        started = time.monotonic()
        connection.sock.shutdown(2)
        connection.close()
        stats = app.state.batcher.stats
        while stats["cancelled"] == 0 and time.monotonic() - started < 30:
            time.sleep(0.02)
        assert stats["cancelled"] == 1 and time.monotonic() - started < 1.5


def test_a_port_in_use_is_one_line_before_uvicorn_starts():
    import socket

    from unimodal.errors import UserError
    from unimodal.inference.server import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=rf"cannot listen on 127\.0\.0\.1:{port}: Address already in use \(is another server"):
            serve(slowed_assistant(0.0), port=port, model_name="tiny")
        with pytest.raises(UserError, match=r"cannot listen on nowhere\.invalid:8000: --host is not an address or a name that resolves"):
            serve(slowed_assistant(0.0), host="nowhere.invalid", model_name="tiny")  # .invalid never resolves (RFC 6761)
    with socket.socket() as probe:  # TEST-NET-1 is never this machine's, unless it binds non-local addresses
        try:
            probe.bind(("192.0.2.1", 0))
            return
        except OSError:
            pass
    with pytest.raises(UserError, match=r"cannot listen on 192\.0\.2\.1:8000: .* \(--host is not an address of this machine\)"):
        serve(slowed_assistant(0.0), host="192.0.2.1", model_name="tiny")
