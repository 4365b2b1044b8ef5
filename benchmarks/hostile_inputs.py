"""Peak memory of `unimodal serve` under hostile requests, one fresh server per request.

Each case starts the server on an export, reads its resident memory once it answers, sends one
request, and reports the status, the seconds the request took, and how far the server's peak RSS
(``VmHWM``) rose above its idle RSS. A plain drawing request is the baseline, measured the same way.

    python benchmarks/hostile_inputs.py runs/demo/model
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np


def wav(seconds: float, rate: int) -> bytes:
    import soundfile as sf

    out = io.BytesIO()
    sf.write(out, np.zeros(int(seconds * rate), np.float32), rate, format="WAV")
    return out.getvalue()


def long_flac(hours: float, rate: int = 8000) -> bytes:
    """Hours of silence: FLAC compresses it to about a megabyte, so only its header is large."""
    import soundfile as sf

    out = io.BytesIO()
    block = np.zeros(rate * 60, np.int16)
    with sf.SoundFile(out, "w", samplerate=rate, channels=1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(int(hours * 60)):
            f.write(block)
    return out.getvalue()


def huge_png(side: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (side, side)).save(out, format="PNG", optimize=True)
    return out.getvalue()


def audio_part(data: bytes, fmt: str) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def user(*parts: dict | str) -> list[dict]:
    content = [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


CASES: dict[str, Callable[[], dict]] = {
    "baseline: draw a digit": lambda: {"messages": user("Draw the digit 7."), "max_tokens": 40},
    'image {"steps": 10000000}': lambda: {"messages": user("Draw the digit 7."), "image": {"steps": 10_000_000}},
    'image {"steps": "x"}': lambda: {"messages": user("Draw the digit 7."), "image": {"steps": "x"}},
    "2,000 short messages": lambda: {
        "messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(2000)],
        "max_tokens": 8,
    },
    "a one-second WAV at 4001 Hz": lambda: {"messages": user("Transcribe this.", audio_part(wav(1.0, 4001), "wav")), "max_tokens": 20},
    "a 12000x12000 PNG": lambda: {
        "messages": user("What is this?", {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(huge_png(12000)).decode()}}),
        "max_tokens": 20,
    },
    "a ten-hour FLAC": lambda: {"messages": user("Transcribe this.", audio_part(long_flac(10), "flac")), "max_tokens": 20},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def post(port: int, body: dict, timeout: float) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, ""
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}").get("error", {}).get("message", "")[:90]


def run_case(model: str, body: dict, max_seconds: float) -> tuple[int, float, float, float, str]:
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    server = subprocess.Popen(
        [sys.executable, "-m", "unimodal", "serve", model, "--port", str(port), "--max_seconds", str(max_seconds)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.5)
        idle = rss_kb(server.pid, "VmRSS")
        started = time.perf_counter()
        status, message = post(port, body, timeout=max_seconds + 60)
        seconds = time.perf_counter() - started
        peak = rss_kb(server.pid, "VmHWM")
        return status, seconds, idle / 1024, (peak - idle) / 1024, message
    finally:
        server.terminate()
        server.wait(timeout=30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an export directory, e.g. runs/demo/model (make demo)")
    parser.add_argument("--max-seconds", type=float, default=15.0, help="the server's --max_seconds")
    args = parser.parse_args(argv)
    if not (Path(args.model) / "unimodal.json").is_file():
        parser.error(f"{args.model} is not an export: run `make demo` first, or pass an export directory")
    print(f"{'request':32s} {'status':>6s} {'seconds':>8s} {'idle MB':>8s} {'peak rise MB':>13s}  message")
    for name, make in CASES.items():
        body = make()
        size = len(json.dumps(body)) / 1024
        status, seconds, idle, rise, message = run_case(args.model, body, args.max_seconds)
        print(f"{name:32s} {status:6d} {seconds:8.2f} {idle:8.0f} {rise:13.0f}  ({size:.0f} KB body) {message}")


if __name__ == "__main__":
    main()
