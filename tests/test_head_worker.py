"""The diffusion head in a worker process: the same answers as in-process, and a worker that
fails costs its rows nothing but time."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from inference_helpers import media_assistant

from unimodal.inference import head_worker as worker_module
from unimodal.inference.head_worker import HeadWorker, causal_heads, wanted


def batch(assistant):
    """Pictures (one guided) drawn beside text and speech rows, each seeded."""
    asks = [
        ("draw", "image", dict(seed=5, max_new_tokens=10)),
        ("draw", "image", dict(seed=6, max_new_tokens=10, image={"cfg_scale": 2.0})),
        ("hi there", None, dict(temperature=0.9, seed=3, max_new_tokens=12)),
        ("speak", "audio", dict(seed=7, max_new_tokens=10, audio={"top_k": 5})),
        ("tell me", None, dict(temperature=0.0, max_new_tokens=14)),
    ]
    settings = [assistant.resolve(**kw) for _, _, kw in asks]
    prompts = [assistant.prompt([{"role": "user", "content": text}], s, start) for (text, start, _), s in zip(asks, settings)]
    return prompts, settings


def answers(assistant):
    prompts, settings = batch(assistant)
    answered = {}  # as a server takes them: each reply when its row ends (media decoded aside, with a worker)
    replies = assistant.answer(prompts, settings, on_reply=answered.__setitem__)
    assert answered == dict(enumerate(replies))
    out = []
    for reply in replies:
        for part in reply.parts:
            out.append(part.text if part.type == "text" else np.asarray(part.data, dtype=np.float64))
            if part.type != "text":  # and what the codec made of it, here or in the worker
                out.append(np.asarray(part.image if part.type == "image" else part.audio, dtype=np.float64))
        out.append(reply.finish_reason)
    return out


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, np.ndarray):  # features of calls grouped otherwise: the last float bit may differ
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        else:
            assert x == y


@pytest.fixture
def assistant():
    return media_assistant()


def test_the_worker_draws_what_this_process_draws_while_the_other_rows_step(assistant, monkeypatch):
    alone = answers(assistant)
    sent = []
    draw, decode = HeadWorker.draw, HeadWorker.decode
    monkeypatch.setattr(HeadWorker, "draw", lambda self, name, hidden, *rest: sent.append(("draw", name)) or draw(self, name, hidden, *rest))
    monkeypatch.setattr(HeadWorker, "decode", lambda self, kind, *rest: sent.append(("decode", kind)) or decode(self, kind, *rest))
    threads = torch.get_num_threads()
    worker = assistant.engine.head_worker = HeadWorker(assistant.model, assistant.engine.modes.values(), assistant.processor.codecs)
    try:
        assert worker.names == ["image"] and torch.get_num_threads() == max(1, threads - 1)
        same(answers(assistant), alone)
        assert {("draw", "image"), ("decode", "image"), ("decode", "audio")} <= set(sent), sent  # and media of replies that ended first
        same(answers(assistant), alone)  # and again: no answer of the last batch is left in the pipe
    finally:
        worker.close()
        assistant.engine.head_worker = None
    assert not worker._process.is_alive() and torch.get_num_threads() == threads


def test_a_worker_that_stops_leaves_its_rows_to_this_process(assistant, caplog):
    alone = answers(assistant)
    worker = assistant.engine.head_worker = HeadWorker(assistant.model, assistant.engine.modes.values(), assistant.processor.codecs)
    worker._process.kill()
    worker._process.join(5)
    with caplog.at_level(logging.WARNING, logger="unimodal.generate"):
        same(answers(assistant), alone)
    assert assistant.engine.head_worker is None
    lines = [r.getMessage() for r in caplog.records if "head worker" in r.getMessage()]
    assert len(lines) == 1 and "drawing in this process from now on" in lines[0]


def test_a_failing_head_call_is_an_error_of_the_worker_and_the_rows_draw_here(assistant, monkeypatch, caplog):
    alone = answers(assistant)

    def broken(heads, codecs, conn, servers_end):  # answers every call with the error the head raised
        servers_end.close()
        while conn.recv() is not None:
            conn.send("ValueError: no such head")

    monkeypatch.setattr(worker_module, "_serve", broken)
    assistant.engine.head_worker = HeadWorker(assistant.model, assistant.engine.modes.values(), assistant.processor.codecs)
    with caplog.at_level(logging.WARNING, logger="unimodal.generate"):
        same(answers(assistant), alone)
    assert assistant.engine.head_worker is None
    assert any("the head worker process failed: ValueError: no such head" in r.getMessage() for r in caplog.records)


def test_a_worker_that_dies_while_it_decodes_leaves_those_replies_to_this_process(assistant, monkeypatch, caplog):
    import os

    alone = answers(assistant)

    def crashing(heads, codecs, conn, servers_end):  # draws, then dies on the first clip or picture to decode
        servers_end.close()
        torch.set_num_threads(1)  # as the worker does: a fork's OpenMP pool would hang
        while True:
            request = conn.recv()
            if request is None or request[0] == "decode":
                os._exit(1)
            conn.send(worker_module._draw(heads, *request[1:]))

    monkeypatch.setattr(worker_module, "_serve", crashing)
    monkeypatch.setattr(worker_module, "ANSWER_S", 60.0)
    assistant.engine.head_worker = HeadWorker(assistant.model, assistant.engine.modes.values(), assistant.processor.codecs)
    with caplog.at_level(logging.WARNING, logger="unimodal.generate"):
        same(answers(assistant), alone)
    assert assistant.engine.head_worker is None
    lines = [r.getMessage() for r in caplog.records if "head worker" in r.getMessage()]
    assert len(lines) == 1 and "stopped" in lines[0], lines


def test_a_worker_is_wanted_on_a_cpu_with_a_core_to_spare_for_a_causal_head(assistant, monkeypatch):
    model, modes = assistant.model, assistant.engine.modes.values()
    assert causal_heads(model, modes) == ["image"]
    monkeypatch.setattr(worker_module.os, "cpu_count", lambda: 2)
    assert wanted(model, modes, torch.device("cpu"))
    assert not wanted(model, modes, torch.device("cuda"))
    assert not wanted(model, [m for m in modes if m.kind != "causal"], torch.device("cpu"))
    monkeypatch.setattr(worker_module.os, "cpu_count", lambda: 1)
    assert not wanted(model, modes, torch.device("cpu"))


def test_asking_for_a_worker_a_model_cannot_use_is_one_line_before_the_server_starts():
    from inference_helpers import text_assistant

    from unimodal.errors import UserError
    from unimodal.inference.server import serve

    with pytest.raises(UserError, match="--head_worker true: the worker draws for an fp32 per-token diffusion head on the CPU"):
        serve(text_assistant(), port=0, model_name="tiny", head_worker=True)


def test_the_worker_ends_when_the_server_is_gone(assistant):
    """A server killed (SIGKILL, out of memory) sends no goodbye: the worker ends at its pipe's end."""
    threads = torch.get_num_threads()
    worker = HeadWorker(assistant.model, assistant.engine.modes.values(), assistant.processor.codecs)
    try:
        worker._conn.close()  # all a killed server leaves of its end
        worker._process.join(10)
        assert not worker._process.is_alive()
    finally:
        worker._process.kill()
        torch.set_num_threads(threads)


def test_picture_rows_whose_spans_open_apart_share_the_workers_calls(assistant, monkeypatch):
    """A picture row ready for its next slot while another's call is on its way waits to join the
    next call, so that every call draws every picture being drawn: groups out of phase would each
    wait for the others' calls in the worker, their rows sitting out steps meanwhile. The answers
    are this process's."""
    from unimodal.inference.engine import _Run

    asks = [("draw", "image", dict(seed=5, max_new_tokens=10)),
            ("hi there", None, dict(temperature=1.0, seed=4, max_new_tokens=16)),
            ("tell me", None, dict(temperature=1.0, seed=104, max_new_tokens=16)),  # opens a picture at its second position
            ("speak", "audio", dict(seed=7, max_new_tokens=10))]
    settings = [assistant.resolve(**kw) for _, _, kw in asks]
    prompts = [assistant.prompt([{"role": "user", "content": text}], s, start) for (text, start, _), s in zip(asks, settings)]

    def replies():
        return [(p.type, p.text if p.type == "text" else np.asarray(p.data)) for r in assistant.answer(prompts, settings) for p in r.parts]

    alone = replies()
    sent, send = [], _Run._send

    def recording(run, rows):
        drawing = {r.index for r in run.rows if not r.done and r.mode is not None and r.mode.kind == "causal" and r.remaining > 0}
        sent.append(({r.index for r in rows}, drawing))
        return send(run, rows)

    monkeypatch.setattr(_Run, "_send", recording)
    worker = assistant.engine.head_worker = HeadWorker(assistant.model, assistant.engine.modes.values(), assistant.processor.codecs)
    try:
        together = replies()
    finally:
        worker.close()
        assistant.engine.head_worker = None
    assert [kind for kind, _ in together] == [kind for kind, _ in alone] and sum(kind == "image" for kind, _ in alone) == 2
    for (kind, mine), (_, theirs) in zip(together, alone):
        assert mine == theirs if kind == "text" else np.allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    assert any(len(rows) == 2 for rows, _ in sent), sent  # the two pictures were drawn together
    assert all(rows == drawing for rows, drawing in sent), sent
