"""The per-token diffusion head, and the decoding of finished replies' media, on a second CPU core.

In a batch, rows drawing a picture slot (Orthus-style causal spans) call their modality's head,
a sampler of tens of head passes, while every other row waits for the step; a row that ends has
its media decoded (Griffin-Lim for speech) while the others wait too. On a CPU the second core
sits idle meanwhile, and a Python thread cannot use it (these small ops hold the GIL far more
than they release it). A :class:`HeadWorker` is a forked process holding the model's heads and
the codecs: the engine sends it the hidden states, settings and generator states of the drawing
rows and steps the other rows until the features come back; the chat layer sends it the media of
a reply that ends while other rows go on (benchmarks/head_overlap.py, serving.py). Arrays and
generator states cross the pipe as numpy arrays and bytes, not tensors, which torch would pass
through a shared-memory file each. The worker's draws and decodings equal the in-process ones
bit for bit: it runs the same modules from the same generator states.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from unimodal.inference.cache import compute_dtype
from unimodal.inference.modes import MediaMode
from unimodal.models.unified import UnifiedModel

ANSWER_S = 600.0  # no head call of a served model takes this long; past it the worker is taken as hung


def generator_states(generators: Iterable[torch.Generator]) -> list[bytes]:
    """The generators' states as bytes, which cross a pipe without a shared-memory file each."""
    return [g.get_state().numpy().tobytes() for g in generators]


def restore_states(generators: Iterable[torch.Generator], states: Iterable[bytes]) -> None:
    for generator, state in zip(generators, states):
        generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))


class HeadWorkerError(RuntimeError):
    """The worker process failed or stopped; the engine draws in-process from then on."""


class Call:
    """One call sent to the worker. ``answer`` is what came back (a string: the worker's error),
    set when it is read, by whichever caller reads the pipe; ``then(call)`` runs at that moment,
    or with ``failed`` set when the worker is closed first."""

    def __init__(self, then: Callable[[Call], None] | None = None):
        self.then = then
        self.answered = False
        self.answer: Any = None
        self.failed: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.answered and self.failed is None and not isinstance(self.answer, str)

    def settle(self, answer: Any = None, failed: str | None = None) -> None:
        self.answered, self.answer, self.failed = True, answer, failed
        if self.then is not None:
            self.then(self)


def causal_heads(model: UnifiedModel, modes: Iterable[MediaMode]) -> list[str]:
    """The modalities whose head draws one slot at a time in fp32 (the ones a worker can take:
    numpy carries no bf16)."""
    return sorted({m.name for m in modes if m.kind == "causal" and compute_dtype(model.continuous[m.name]) == torch.float32})


def wanted(model: UnifiedModel, modes: Iterable[MediaMode], device: torch.device) -> bool:
    """A worker pays off on a CPU with a core to spare, for a model with a causal head."""
    forks = sys.platform.startswith("linux")  # fork is the start method, and it is unsafe on macOS
    return device.type == "cpu" and (os.cpu_count() or 1) >= 2 and forks and bool(causal_heads(model, modes))


class HeadWorker:
    """A forked process that draws head slots for :class:`~unimodal.inference.engine.Engine`.

    Calls are answered in the order they are sent: :meth:`draw` and :meth:`decode` send one,
    :meth:`poll` reads the answers that have come, :meth:`features` and :meth:`wait_all` wait for
    them. The torch threads of this process drop by one, so that the backbone and the worker each
    have cores of their own.
    """

    def __init__(self, model: UnifiedModel, modes: Iterable[MediaMode], codecs: Mapping[str, Any] | None = None):
        self.names = causal_heads(model, modes)
        self._conn, child = multiprocessing.Pipe()
        heads = {name: model.continuous[name] for name in self.names}
        self._process = multiprocessing.get_context("fork").Process(target=_serve, args=(heads, dict(codecs or {}), child, self._conn),
                                                                   name="unimodal-head", daemon=True)
        self._process.start()
        child.close()
        self._calls: deque[Call] = deque()  # sent and not yet answered, oldest first
        self._threads = torch.get_num_threads()
        torch.set_num_threads(max(1, self._threads - 1))

    def draw(self, name: str, hidden: torch.Tensor, cfg_scale: Sequence[float], steps: Sequence[int | None],
             generators: Sequence[torch.Generator]) -> Call:
        """Head ``name``'s next slot for each row of ``hidden`` (:meth:`features` takes it in)."""
        return self._send(("draw", name, hidden.detach().float().cpu().numpy(), list(cfg_scale), list(steps), generator_states(generators)))

    def decode(self, kind: str, data: Any, then: Callable[[Call], None]) -> Call:
        """The ``kind`` codec's decoding of ``data``, passed to ``then`` when it is read."""
        return self._send(("decode", kind, np.asarray(data)), then)

    def _send(self, request: tuple, then: Callable[[Call], None] | None = None) -> Call:
        try:
            self._conn.send(request)
        except OSError as err:
            raise HeadWorkerError(f"the head worker process is gone ({err})") from None
        call = Call(then)
        self._calls.append(call)
        return call

    def poll(self) -> None:
        """Read every answer that has come (running the ``then`` of each)."""
        while self._calls and self._ready(0):
            self._read()

    def features(self, call: Call, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """A draw's features, once answered; ``generators`` (that call's) continue from where the worker's ended."""
        while not call.answered:
            self._read()
        if call.failed is not None:
            raise HeadWorkerError(call.failed)
        if isinstance(call.answer, str):
            raise HeadWorkerError(f"the head worker process failed: {call.answer}")
        features, states = call.answer
        restore_states(generators, states)
        return torch.from_numpy(features)

    def wait_all(self) -> None:
        """Wait for every call sent."""
        while self._calls:
            self._read()

    def _ready(self, timeout: float) -> bool:
        try:
            return self._conn.poll(timeout)
        except (EOFError, OSError) as err:
            raise HeadWorkerError(f"the head worker process stopped ({type(err).__name__})") from None

    def _read(self) -> None:
        if not self._ready(ANSWER_S):
            raise HeadWorkerError(f"the head worker process gave no answer in {ANSWER_S:.0f} s")
        try:
            answer = self._conn.recv()
        except (EOFError, OSError) as err:
            raise HeadWorkerError(f"the head worker process stopped ({type(err).__name__})") from None
        self._calls.popleft().settle(answer)

    def close(self) -> None:
        """End the process and give this one its threads back; calls still unanswered fail."""
        while self._calls:
            self._calls.popleft().settle(failed="the head worker process was closed")
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._process.join(5)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._conn.close()
        torch.set_num_threads(self._threads)


def _serve(heads: dict[str, Any], codecs: dict[str, Any], conn: Connection, servers_end: Connection) -> None:
    # the server's handlers came with the fork; Ctrl-C reaches the whole process group, and the
    # server ends this process itself (close), or its pipe does (the server killed): the fork's
    # copy of the server's end would keep the pipe open
    servers_end.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(1)
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        try:
            conn.send(_draw(heads, *request[1:]) if request[0] == "draw" else _plain(codecs[request[1]].decode(request[2])))
        except Exception as err:  # noqa: BLE001 - sent back, raised in the server
            conn.send(f"{type(err).__name__}: {err}")


def _draw(heads: dict[str, Any], name: str, hidden: np.ndarray, cfg_scale: list[float], steps: list[int | None],
          states: list[bytes]) -> tuple[np.ndarray, list[bytes]]:
    generators = [torch.Generator() for _ in states]
    restore_states(generators, states)
    with torch.no_grad():
        features = heads[name].sample_next(torch.from_numpy(np.ascontiguousarray(hidden)), cfg_scale=cfg_scale, steps=steps,
                                           generator=generators)
    return features.float().numpy(), generator_states(generators)


def _plain(decoded: Any) -> Any:
    """A codec's output with tensors as numpy arrays (a tensor would cross through a shared-memory file)."""
    if isinstance(decoded, tuple):
        return tuple(_plain(item) for item in decoded)
    return decoded.numpy() if isinstance(decoded, torch.Tensor) else decoded
