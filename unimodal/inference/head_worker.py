"""The per-token diffusion head on a second CPU core, beside the backbone's steps.

In a batch, rows drawing a picture slot (Orthus-style causal spans) call their modality's head,
a sampler of tens of head passes, while every other row waits for the step. On a CPU the second
core sits idle meanwhile, and a Python thread cannot use it (these small ops hold the GIL far
more than they release it). A :class:`HeadWorker` is a forked process holding the model's heads:
the engine sends it the hidden states, settings and generator states of the drawing rows and
steps the other rows until the features come back (benchmarks/head_overlap.py, serving.py).
Arrays and generator states cross the pipe as numpy arrays and bytes, not tensors, which torch
would pass through a shared-memory file each. The worker's draws equal the in-process ones bit
for bit: it runs the same module from the same generator states.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Iterable, Sequence
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

    Calls are answered in the order they are sent: :meth:`submit` sends one, :meth:`ready` says
    whether the oldest is answered, :meth:`receive` waits for it. The torch threads of this process
    drop by one, so that the backbone and the head each have cores of their own.
    """

    def __init__(self, model: UnifiedModel, modes: Iterable[MediaMode]):
        self.names = causal_heads(model, modes)
        self._conn, child = multiprocessing.Pipe()
        heads = {name: model.continuous[name] for name in self.names}
        self._process = multiprocessing.get_context("fork").Process(target=_serve, args=(heads, child, self._conn), name="unimodal-head",
                                                                   daemon=True)
        self._process.start()
        child.close()
        self._waiting = 0
        self._threads = torch.get_num_threads()
        torch.set_num_threads(max(1, self._threads - 1))

    def submit(self, name: str, hidden: torch.Tensor, cfg_scale: Sequence[float], steps: Sequence[int | None],
               generators: Sequence[torch.Generator]) -> None:
        try:
            self._conn.send((name, hidden.detach().float().cpu().numpy(), list(cfg_scale), list(steps), generator_states(generators)))
        except OSError as err:
            raise HeadWorkerError(f"the head worker process is gone ({err})") from None
        self._waiting += 1

    def ready(self) -> bool:
        return self._waiting > 0 and self._conn.poll(0)

    def receive(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """The oldest call's features; ``generators`` (that call's) continue from where the worker's ended."""
        try:
            if not self._conn.poll(ANSWER_S):
                raise HeadWorkerError(f"the head worker process gave no answer in {ANSWER_S:.0f} s")
            answer = self._conn.recv()
        except (EOFError, OSError) as err:
            raise HeadWorkerError(f"the head worker process stopped ({type(err).__name__})") from None
        self._waiting -= 1
        if isinstance(answer, str):
            raise HeadWorkerError(f"the head worker process failed: {answer}")
        features, states = answer
        restore_states(generators, states)
        return torch.from_numpy(features)

    def close(self) -> None:
        """End the process and give this one its threads back."""
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


def _serve(heads: dict[str, Any], conn: Connection, servers_end: Connection) -> None:
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
        name, hidden, cfg_scale, steps, states = request
        try:
            generators = [torch.Generator() for _ in states]
            restore_states(generators, states)
            with torch.no_grad():
                features = heads[name].sample_next(torch.from_numpy(np.ascontiguousarray(hidden)), cfg_scale=cfg_scale,
                                                   steps=steps, generator=generators)
            conn.send((features.float().numpy(), generator_states(generators)))
        except Exception as err:  # noqa: BLE001 - sent back, raised in the server
            conn.send(f"{type(err).__name__}: {err}")
