"""Concurrent requests gathered into one engine batch.

The engine answers a batch in one backbone pass per step, each row with its own settings, seed
and deadline, so on hardware a single conversation leaves idle, several cost little more than
one. The :class:`Batcher` owns the model: one worker takes the first waiting request,
gathers those that arrive within ``gather_s`` (up to ``max_rows`` rows), and runs them together.
A request that arrives while a batch runs waits for the next one: rows never join a running batch
(static batching), but a request is answered as soon as its own rows end, not when the batch's
longest reply does. Beam-search requests, whose loop is separate, run in batches of their own.

A job that cannot start before ``wait_until``, or that finds ``max_waiting`` jobs waiting, fails
with :class:`Busy`. A job's ``timeout_s`` counts from its start, its prompt (decoding its media)
included; a row past it or cancelled (a client gone, the server stopping) leaves its batch and its
job fails with :class:`~unimodal.inference.outputs.GenerationTimeout`, while the other rows go on.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, replace
from typing import Any

from unimodal.data.processor import EncodedDocument
from unimodal.inference.chat import Assistant, ChatError, Message, Reply, ReplyPart
from unimodal.inference.engine import EXPIRED, row_settings
from unimodal.inference.outputs import GenerationTimeout, expired_error
from unimodal.models.generation import GenerationSettings

log = logging.getLogger("unimodal.serve")

STOPPING = "generation cancelled: the server is stopping"

# a started job with its rows: (prompt, dropped messages) and settings, one per reply (n)
Started = tuple["Job", list[tuple[tuple[EncodedDocument, int], GenerationSettings]]]


class Busy(RuntimeError):
    """A job waited for the model past its ``wait_until`` without starting."""


@dataclass
class Job:
    """One request: ``n`` replies to ``messages`` with ``settings`` (:meth:`GenerationSettings.replace`
    keywords). ``on_text(choice, text)`` receives text as it is generated, and ``on_media(choice,
    part)`` each media part once written and decoded, both from the worker thread. Setting
    ``cancel`` takes the job's rows out of their batch at the next step."""

    messages: list[Message]
    settings: dict[str, Any]
    timeout_s: float
    wait_until: float
    n: int = 1
    start_with: str | None = None
    on_text: Callable[[int, str], None] | None = None
    on_media: Callable[[int, ReplyPart], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)
    streamed: bool = False  # whether ``on_text`` or ``on_media`` has had a part of the reply
    # set once the job's prompt is made (the request is accepted), or failed with why it is not
    accepted: Future = field(default_factory=Future)


class Batcher:
    """The model's one worker: jobs in, batches of up to ``max_rows`` rows out (see the module).

    It works on a thread of its own, or, with ``thread=False``, on the caller's when it calls
    :meth:`run`: ``unimodal serve`` runs it on the thread that loaded the model, which on a CPU
    generates about twice as fast as any other (libgomp's thread teams and glibc's malloc arenas
    belong to the thread that made them; benchmarks/README.md)."""

    def __init__(self, assistant: Assistant, max_rows: int = 8, gather_s: float = 0.01, thread: bool = True,
                 max_waiting: int = 64):
        if max_rows < 1 or max_waiting < 1:
            raise ValueError(f"max_rows and max_waiting must be >= 1, got {max_rows} and {max_waiting}")
        self.assistant, self.max_rows, self.gather_s, self.max_waiting = assistant, max_rows, gather_s, max_waiting
        self.stopping = threading.Event()
        self.stats: Counter[str] = Counter()  # finished rows by reason, and batches and their rows
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._held: deque[Job] = deque()  # taken from the queue but left for a later batch
        self._running: list[Job] = []
        self._thread = threading.Thread(target=self.run, name="unimodal-batcher", daemon=True) if thread else None
        if self._thread is not None:
            self._thread.start()

    def submit(self, job: Job) -> Job:
        """Queue ``job``; each waiting job holds its request's messages, so their number is bounded."""
        if self.stopping.is_set():  # both futures: a stream waits on ``accepted`` first
            _fail(job, GenerationTimeout(STOPPING))
        elif self._queue.qsize() + len(self._held) >= self.max_waiting:
            _fail(job, Busy(f"{self.max_waiting} requests are waiting for the model already"))
        else:
            self._queue.put(job)
        return job

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running batch and every waiting job, and end the worker."""
        self.stopping.set()
        for job in list(self._running):
            job.cancel.set()
        self._queue.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the worker -------------------------------------------------------------------------

    def run(self) -> None:
        """Answer jobs until :meth:`stop`."""
        while True:
            jobs = self._gather()
            if jobs is None:
                return
            self._running = jobs
            if self.stopping.is_set():  # stop() came while this batch was gathered, or before it saw _running
                for job in jobs:
                    job.cancel.set()
            try:
                self._run(jobs)
            except Exception as err:  # noqa: BLE001 - the worker must outlive any one batch
                log.error("a batch failed", exc_info=err)
                for job in jobs:
                    _fail(job, err)
            finally:
                self._running = []

    def _next(self, timeout: float | None) -> Job | None:
        if self._held:
            return self._held.popleft()
        return self._queue.get(timeout=timeout)

    def _gather(self) -> list[Job] | None:
        """The next batch: the first waiting job and those that come within ``gather_s``, up to
        ``max_rows`` rows; None once stopping (every job still waiting is cancelled)."""
        first = self._next(None)
        while first is not None and first.future.cancelled():  # its caller left while it waited: it takes no row
            first = self._next(None)
        if first is None or self.stopping.is_set():
            self._cancel_waiting(first)
            return None
        jobs, rows, later = [first], first.n, []
        until = time.monotonic() + self.gather_s
        gathering = not self._beams(first)
        while rows < self.max_rows and gathering:
            try:
                job = self._next(max(0.0, until - time.monotonic()))
            except queue.Empty:
                break
            if job is None:  # stop() was called: this batch still runs, and is cancelled
                self._queue.put(None)
                break
            if job.future.cancelled():  # its caller left while it waited: it takes no row
                continue
            if self._beams(job) or rows + job.n > self.max_rows:
                later.append(job)
                continue
            jobs.append(job)
            rows += job.n
        self._held.extendleft(reversed(later))
        return jobs

    def _beams(self, job: Job) -> bool:
        """Whether ``job`` searches beams, by its settings over the model's own (MIO's default is 5)."""
        try:
            return self.assistant.resolve(**job.settings).text.num_beams > 1
        except (TypeError, ValueError):  # refused settings: the job fails alone when it starts
            return False

    def _cancel_waiting(self, first: Job | None) -> None:
        pending = [first] if first is not None else []
        pending += list(self._held)
        self._held.clear()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                pending.append(job)
        for job in pending:
            _fail(job, GenerationTimeout(STOPPING))

    def _run(self, jobs: list[Job]) -> None:
        """Prompts per job (a bad one fails alone), one generation for every row, replies back.
        A generation that fails for a reason of one request (no row can say which) runs again one
        job at a time, so that only the job that causes it gets the error."""
        started = self._start(jobs)
        if not started:
            return
        began = time.monotonic()
        try:
            self._generate(started)
        except Exception as err:  # noqa: BLE001 - sorted out below, job by job
            if len(started) == 1:
                raise
            log.warning("a batch of %d requests failed (%s: %s); running them one at a time", len(started), type(err).__name__, err)
            for job, rows in started:
                if job.future.done():  # answered before the failure
                    continue
                if job.streamed:  # its client already has part of a reply that a rerun would repeat
                    _fail(job, err)
                    continue
                left = job.timeout_s - (time.monotonic() - began)  # the rerun has what the batch left of timeout_s
                if left <= 0:
                    self.stats["timeout"] += job.n
                    _fail(job, expired_error(["timeout"]))
                    continue
                try:
                    self._generate([(job, [(prompt, replace(row, timeout_s=left)) for prompt, row in rows])])
                except Exception as own:  # noqa: BLE001 - this job's own failure is its answer
                    log.error("a request failed", exc_info=own)
                    _fail(job, own)

    def _start(self, jobs: list[Job]) -> list[Started]:
        """Mark the jobs running and make their rows (prompt, settings); a job whose messages or
        settings are refused, whose caller is gone, that waited too long or whose prompt took its
        whole ``timeout_s`` fails here, alone."""
        now = time.monotonic()
        started = []
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():
                continue  # its caller is gone
            if job.cancel.is_set():
                self.stats["cancelled"] += job.n
                _fail(job, expired_error(["cancelled"]))
                continue
            if now > job.wait_until:
                _fail(job, Busy(f"the request waited {now - job.arrived:.1f} s for the model"))
                continue
            began = time.monotonic()
            try:
                resolved = self.assistant.resolve(**job.settings, timeout_s=job.timeout_s)
                rows = row_settings(resolved, job.n)
                prompt = self.assistant.prompt(job.messages, resolved, job.start_with)
            except (ChatError, ValueError) as err:  # the request's own mistake (a ValueError later is a bug)
                _fail(job, err if isinstance(err, ChatError) else ChatError(str(err)))
                continue
            # the prompt's own time (media decoded and encoded) counts against the request's limit
            left = job.timeout_s - (time.monotonic() - began)
            if job.cancel.is_set() or left <= 0:
                reason = "cancelled" if job.cancel.is_set() else "timeout"
                self.stats[reason] += job.n
                _fail(job, expired_error([reason]))
                continue
            rows = [replace(row, timeout_s=left) for row in rows]
            with contextlib.suppress(InvalidStateError):  # cancelled by a caller that left
                job.accepted.set_result(None)
            started.append((job, [(prompt, row) for row in rows]))
        return started

    def _generate(self, started: list[Started]) -> None:
        """One generation for every row of ``started``; each job gets its replies or its error."""
        owners = [(job, choice) for job, rows in started for choice in range(len(rows))]
        rows = [row for _, job_rows in started for row in job_rows]
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)

        answers: dict[int, list[Reply | None]] = {id(job): [None] * len(job_rows) for job, job_rows in started}

        def on_text(row: int, text: str) -> None:
            job, choice = owners[row]
            if job.on_text is not None:
                job.streamed = True
                job.on_text(choice, text)

        def on_media(row: int, part: ReplyPart) -> None:
            job, choice = owners[row]
            if job.on_media is not None:
                job.streamed = True  # sent: a batch that fails now is not run again for this job
                job.on_media(choice, part)

        def on_reply(row: int, reply: Reply) -> None:
            """A job is answered once its last row has ended, while the batch goes on."""
            job, choice = owners[row]
            own = answers[id(job)]
            own[choice] = reply
            self.stats[reply.finish_reason] += 1
            if any(r is None for r in own):
                return
            expired = [r.finish_reason for r in own if r.finish_reason in EXPIRED]
            if expired:
                _fail(job, expired_error(expired))
            else:
                with contextlib.suppress(InvalidStateError):  # cancelled by a caller that left
                    job.future.set_result(own)

        try:
            streams_media = any(job.on_media is not None for job, _ in started)
            replies = self.assistant.answer([prompt for prompt, _ in rows], [settings for _, settings in rows], on_text=on_text,
                                            cancel=[job.cancel for job, _ in owners], on_reply=on_reply,
                                            on_media=on_media if streams_media else None)
        except GenerationTimeout:  # no row was left to answer
            for job, _ in started:
                if job.future.done():
                    continue
                reason = "cancelled" if job.cancel.is_set() else "timeout"
                self.stats[reason] += job.n
                _fail(job, expired_error([reason]))
            return
        for row, reply in enumerate(replies):  # every row has ended: nothing is left unanswered
            job, choice = owners[row]
            if answers[id(job)][choice] is None:
                on_reply(row, reply)


def _fail(job: Job, err: BaseException) -> None:
    for future in (job.accepted, job.future):
        with contextlib.suppress(InvalidStateError):  # done, or cancelled by a caller that left
            future.set_exception(err)
