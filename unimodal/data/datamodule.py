"""The Lightning data module: weighted mixtures of shard sets -> documents -> packed batches.

Why it is built this way:

- the training stream is infinite (shards drawn with replacement) and cut to exactly
  ``steps_per_epoch * accumulate_grad_batches`` batches per rank, so that every rank runs the
  same number of steps (DDP and ZeRO ranks that disagree hang);
- shards are split by rank and worker, so ranks and workers read different data;
- every random choice comes from a generator seeded with (seed, epoch, rank, worker), so the same
  seed gives the same batches;
- ``PackedBatch.window_label_tokens`` is filled in the main process, where the batch order is the
  order the optimizer sees (the DataLoader interleaves its workers), so a loss summed over a
  gradient-accumulation window can be divided by the window's label tokens;
- broken samples are skipped and counted by a :class:`BadSamplePolicy`, which aborts when too many are.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal, TypeVar

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from unimodal.batch import PackedBatch
from unimodal.data.packing import DocumentTooLong, Packer, collate
from unimodal.data.pre_encode import code_sources
from unimodal.data.processor import Processor
from unimodal.data.shards import BadSamplePolicy, ShardError, expand_shards, iter_samples, read_documents, sample_to_document
from unimodal.data.templates import get_template
from unimodal.data.tokenizer import TextTokenizer, load_tokenizer
from unimodal.modalities.base import MediaCodec
from unimodal.modalities.vocab import VocabLayout
from unimodal.schema import Document, DocumentError, local_path

logger = logging.getLogger("unimodal.data")

T = TypeVar("T")
_SHORT_VALIDATION_WARNED: set[tuple[int, int]] = set()


@dataclass
class ShardSet:
    """One source of training data: a shard directory, a brace pattern or one shard, and its weight."""

    path: str
    weight: float = 1.0


@dataclass
class StreamConfig:
    """What a stream needs to turn documents into batches; copied into every DataLoader worker."""

    processor: Processor
    seq_len: int
    batch_size: int
    overlong: Literal["split", "error"] = "split"
    max_bad_fraction: float = 0.01

    def batches(self, docs: Iterable[Document], policy: BadSamplePolicy) -> Iterator[PackedBatch]:
        """Encode, pack and collate; the last batch may be short when ``docs`` ends."""
        processor = self.processor
        packer = Packer(self.seq_len, processor.tokenizer.pad_id, processor.feature_dim, self.overlong)

        def encoded() -> Iterator:
            for doc in docs:
                try:
                    encoded_doc = processor.encode(doc)
                    # checked here: DocumentTooLong raised inside pack() would end its generator
                    packer.pieces(encoded_doc)
                except (DocumentError, DocumentTooLong) as err:
                    policy.skip(err, doc.key, doc.source)
                    continue
                policy.ok()
                yield encoded_doc

        sequences = packer.pack(encoded())
        read = skipped = 0
        while chunk := list(islice(sequences, self.batch_size)):
            batch = collate(chunk)
            batch.samples_read = torch.tensor(policy.seen - read)
            batch.samples_skipped = torch.tensor(policy.skipped - skipped)
            if policy.skipped > skipped:
                batch.skipped_from = policy.last_shard
            read, skipped = policy.seen, policy.skipped
            yield batch


def _shuffled(items: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """A shuffle buffer: shards are read in order, so neighbouring samples would stay together."""
    if size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def _round_robin(streams: list[Iterator[T]]) -> Iterator[T]:
    active = list(streams)
    while active:
        for stream in list(active):
            try:
                yield next(stream)
            except StopIteration:
                active.remove(stream)


def worker_slot() -> tuple[int, int]:
    """This DataLoader worker's index and the worker count ((0, 1) in the main process)."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def worker_share(batches: int, worker: int, workers: int) -> int:
    """How many of a rank's ``batches`` this worker yields: an even split, the first ones one more."""
    return batches // workers + int(worker < batches % workers)


class TrainStream(IterableDataset):
    """The infinite training mixture, cut to ``batches`` per rank per epoch (split across workers)."""

    def __init__(
        self,
        shard_sets: list[list[str]],
        weights: list[float],
        config: StreamConfig,
        batches: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 256,
    ):
        self.shard_sets = shard_sets
        self.probabilities = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.config = config
        self.batches = batches
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0  # set by the train DataLoader before each epoch
        self.policy = BadSamplePolicy(config.max_bad_fraction, enforce=False)

    def __len__(self) -> int:
        return self.batches

    def _rng(self, worker: int, *tags: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, self.rank, worker, *tags])

    def set_documents(self, index: int, worker: int = 0, num_workers: int = 1) -> Iterator[Document]:
        """Documents of one shard set for one (rank, worker) slot, from its shards drawn with replacement."""
        urls = self.shard_sets[index]
        slots, slot = self.world_size * num_workers, self.rank * num_workers + worker
        mine = urls[slot::slots] if len(urls) >= slots else urls
        rng = self._rng(worker, 1, index)

        def samples() -> Iterator[dict]:
            empty_in_a_row = 0
            while True:
                url = mine[int(rng.integers(len(mine)))]
                count = 0
                for count, sample in enumerate(iter_samples([url], self.policy), start=1):
                    yield sample
                empty_in_a_row = 0 if count else empty_in_a_row + 1
                if empty_in_a_row > 10 * len(mine):
                    raise ShardError(
                        f"shard set {index} ({mine[0]} ...) yields no samples: {self.policy.skipped} bad of "
                        f"{self.policy.seen} read; see `unimodal data inspect {mine[0]}`"
                    )

        for sample in _shuffled(samples(), self.shuffle_buffer, self._rng(worker, 2, index)):
            try:
                yield sample_to_document(sample)
            except DocumentError as err:
                self.policy.skip(err, sample.get("__key__", ""), sample.get("__url__", ""))

    def documents(self, worker: int = 0, num_workers: int = 1) -> Iterator[Document]:
        """The weighted mixture: each document comes from a set drawn by weight."""
        streams = [self.set_documents(i, worker, num_workers) for i in range(len(self.shard_sets))]
        rng = self._rng(worker, 0)
        while True:
            yield next(streams[int(rng.choice(len(streams), p=self.probabilities))])

    def __iter__(self) -> Iterator[PackedBatch]:
        worker, num_workers = worker_slot()
        # only counted here: the training process applies the limit to every worker's and rank's sum
        self.policy = BadSamplePolicy(self.config.max_bad_fraction, enforce=False)
        share = worker_share(self.batches, worker, num_workers)
        yield from islice(self.config.batches(self.documents(worker, num_workers), self.policy), share)


class ValStream(IterableDataset):
    """One deterministic pass over the validation sets (interleaved), the same number of batches per rank.

    Every rank reads the first ``batches * world_size`` batches and keeps every ``world_size``-th,
    so its bad-sample policy sees the same counts on every rank and applies its limit itself.
    """

    def __init__(self, shard_sets: list[list[str]], config: StreamConfig, batches: int, rank: int = 0, world_size: int = 1):
        self.shard_sets = shard_sets
        self.config = config
        self.batches = batches
        self.rank, self.world_size = rank, world_size
        self.policy = BadSamplePolicy(config.max_bad_fraction)

    def __iter__(self) -> Iterator[PackedBatch]:
        self.policy = BadSamplePolicy(self.config.max_bad_fraction)
        docs = _round_robin([read_documents(urls, policy=self.policy) for urls in self.shard_sets])
        batches = list(islice(self.config.batches(docs, self.policy), self.batches * self.world_size))
        per_rank = len(batches) // self.world_size
        if per_rank < self.batches and (per_rank, self.batches) not in _SHORT_VALIDATION_WARNED:
            _SHORT_VALIDATION_WARNED.add((per_rank, self.batches))  # the same data every validation: say it once
            logger.warning("validation data fills %d batch%s per rank, fewer than val_batches=%d",
                           per_rank, "" if per_rank == 1 else "es", self.batches)
        for batch in batches[self.rank :: self.world_size][:per_rank]:
            batch.window_label_tokens = torch.tensor(batch.num_label_tokens)
            yield batch


class EpochLoader(DataLoader):
    """A DataLoader over a stream with an ``epoch``, set before each pass so that every epoch
    draws new samples (workers get a copy of the dataset per pass, and see it).

    ``done(epoch)`` says how many batches of the epoch a resumed run already trained on: they are
    produced and dropped, so the run continues with the batches an uninterrupted run would see.
    """

    def __init__(self, dataset: Any, epoch: Callable[[], int], done: Callable[[int], int] | None = None, **kwargs: Any):
        super().__init__(dataset, batch_size=None, generator=torch.Generator(), **kwargs)
        self.epoch = epoch
        self.done = done

    def _start(self) -> tuple[Iterator[Any], int]:
        """This epoch's batches, past those already trained on, and how many those were."""
        epoch = self.epoch()
        self.dataset.epoch = epoch
        # each pass's iterator draws its base seed from the epoch, not from torch's global generator:
        # a run resumed at an epoch's end starts the next pass before its saved RNG state is set
        # again, where an uninterrupted run starts it after, so a global draw would shift every
        # dropout mask and noise sample that follows
        self.generator.manual_seed(epoch)
        batches = super().__iter__()
        skip = self.done(epoch) if self.done is not None else 0
        for _ in islice(batches, skip):
            pass
        return batches, skip

    def __iter__(self) -> Iterator[Any]:
        return self._start()[0]


class WindowedLoader(EpochLoader):
    """The train DataLoader: labels each batch with the label-token count of its
    gradient-accumulation window (``window`` consecutive batches in loader order)."""

    def __init__(
        self, dataset: TrainStream, window: int, epoch: Callable[[], int], done: Callable[[int], int] | None = None, **kwargs: Any
    ):
        super().__init__(dataset, epoch, done, **kwargs)
        self.window = window

    def __iter__(self) -> Iterator[PackedBatch]:
        batches, skip = self._start()
        size = self.window - skip % self.window
        while window := list(islice(batches, size)):
            total = torch.tensor(sum(batch.num_label_tokens for batch in window))
            for batch in window:
                batch.window_label_tokens = total
                yield batch
            size = self.window


def shard_sets(raw: list[ShardSet | dict | str] | None) -> list[ShardSet]:
    """Recipe entries (``ShardSet``s, dicts or plain paths) as shard sets."""
    sets = []
    for entry in raw or []:
        if isinstance(entry, dict):
            entry = ShardSet(**entry)
        elif not isinstance(entry, ShardSet):
            entry = ShardSet(str(entry))
        entry = ShardSet(local_path(entry.path), entry.weight)
        sets.append(entry)
    return sets


def training_mixture(
    datasets: list[ShardSet | dict | str], replay: list[ShardSet | dict | str] | None = None, replay_weight: float = 0.0
) -> list[ShardSet]:
    """The shard sets a run trains on, each weighted by its share of the documents: ``datasets``
    by their weights, with ``replay`` (the data an earlier model was trained on) taking
    ``replay_weight`` of the documents so that a fine-tune keeps the skills it started with.
    An export records this mixture; fine-tuning that export replays it."""
    new, old = shard_sets(datasets), shard_sets(replay)
    if not 0 <= replay_weight < 1:
        raise ValueError(f"replay_weight must be in [0, 1), got {replay_weight}")
    for name, sets in (("datasets", new), ("replay", old)):
        weights = [d.weight for d in sets]
        if weights and (not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0):
            raise ValueError(f"{name}: weights must be finite numbers >= 0 with a positive sum, got {weights}")
    if not new:
        raise ValueError("datasets: give at least one shard set")
    if not old or replay_weight == 0:
        total = sum(d.weight for d in new)
        return [ShardSet(d.path, d.weight / total) for d in new]
    shares: dict[str, float] = {}
    for sets, share in ((new, 1 - replay_weight), (old, replay_weight)):
        total = sum(d.weight for d in sets)
        for d in sets:
            shares[d.path] = shares.get(d.path, 0.0) + share * d.weight / total
    return [ShardSet(path, weight) for path, weight in shares.items()]


class ResumableDataModule(L.LightningDataModule):
    """A data module whose training stream saves its position in checkpoints (the epoch and the
    batches trained on), so that a resumed run goes on with the batches an uninterrupted one would
    see: its train loader passes :meth:`_batches_done` as ``done``, which drops that many."""

    _resume_at: tuple[int, int] | None = None  # (epoch, batches trained) of a resumed run

    def state_dict(self) -> dict[str, Any]:
        if self.trainer is None:
            return {}
        return {"epoch": self.trainer.current_epoch, "batches": self.trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_at = (state["epoch"], state["batches"]) if state else None

    def _batches_done(self, epoch: int) -> int:
        """Batches of ``epoch`` a resumed run has already trained on (once, then 0)."""
        resume, self._resume_at = self._resume_at, None
        return resume[1] if resume is not None and resume[0] == epoch else 0


class UnimodalDataModule(ResumableDataModule):
    """Packed batches from weighted WebDataset shard sets (see ``docs/data-format.md``).

    ``datasets`` and ``val_datasets`` take ``ShardSet``s (dicts and plain paths work too).
    ``steps_per_epoch`` counts optimizer steps: each rank yields ``steps_per_epoch *
    accumulate_grad_batches`` batches per epoch. Raw pixels and waveforms need a codec per modality
    (``codecs``, a :class:`MediaCodec` per modality name); pre-encoded ``.npy`` media need none.
    ``code_layers`` gives the RVQ layers of a code range and ``input_layers`` the layers kept for
    input (loss false) parts, e.g. ``{audio: 1}`` (``docs/audio-tokens.md``). Shards written by
    ``unimodal data encode`` name their tokenizer; codes of another tokenizer than the codec's or
    than another set's are refused, and the tokenizer enters the vocabulary layout.
    ``chat_template`` (``chatml`` | ``vicuna``) renders documents whose parts carry roles as
    chats, supervising only assistant turns (``unimodal.data.templates``, ``docs/chat-data.md``).
    ``replay`` names the data a fine-tuned model was trained on, mixed back in as
    ``replay_weight`` of the training documents (:func:`training_mixture`; fine-tuning an export
    fills it from the export's record, ``docs/finetune.md``). ``allow_pipe_urls`` lets shard
    specs be ``pipe:`` commands (WebDataset streaming, e.g. ``pipe:aws s3 cp ... -``), refused by
    default because they run a shell command.
    """

    def __init__(
        self,
        datasets: list[ShardSet | str],
        tokenizer: str,
        seq_len: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        steps_per_epoch: int = 1000,
        accumulate_grad_batches: int = 1,
        overlong: Literal["split", "error"] = "split",
        feature_dim: int = 0,
        bidirectional: list[str] | None = None,
        code_ranges: dict[str, int] | None = None,
        max_bad_fraction: float = 0.01,
        shuffle_buffer: int = 256,
        val_datasets: list[ShardSet | str] | None = None,
        val_batches: int = 10,
        codecs: dict[str, MediaCodec] | None = None,
        code_layers: dict[str, int] | None = None,
        input_layers: dict[str, int] | None = None,
        chat_template: str | None = None,
        replay: list[ShardSet | str] | None = None,
        replay_weight: float = 0.75,  # docs/finetune.md: 0.5 let a new task's sums pull the demo's stories down by 0.1
        allow_pipe_urls: bool = False,
    ):
        super().__init__()
        self.datasets = shard_sets(datasets)
        self.val_datasets = shard_sets(val_datasets)
        self.replay, self.replay_weight = shard_sets(replay), replay_weight
        self.mixture = training_mixture(self.datasets, self.replay, replay_weight)
        self.allow_pipe_urls = allow_pipe_urls
        if overlong not in ("split", "error"):
            raise ValueError(f"overlong must be 'split' or 'error', got {overlong!r}")
        sizes = {
            "seq_len": seq_len,
            "batch_size": batch_size,
            "steps_per_epoch": steps_per_epoch,
            "accumulate_grad_batches": accumulate_grad_batches,
        }
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.tokenizer_path = local_path(tokenizer)
        self.seq_len, self.batch_size, self.num_workers, self.seed = seq_len, batch_size, num_workers, seed
        self.steps_per_epoch, self.accumulate_grad_batches = steps_per_epoch, accumulate_grad_batches
        self.overlong = overlong
        self.feature_dim = feature_dim
        self.bidirectional = tuple(bidirectional or ())
        self.code_ranges = dict(code_ranges or {})
        self.max_bad_fraction = max_bad_fraction
        self.shuffle_buffer = shuffle_buffer
        self.val_batches = val_batches
        self.codecs: dict[str, MediaCodec] = dict(codecs or {})
        self.code_layers = dict(code_layers or {})
        self.input_layers = dict(input_layers or {})
        get_template(chat_template)  # an unknown name fails here, not in a DataLoader worker
        self.chat_template = chat_template
        self._tokenizer: TextTokenizer | None = None
        self._layout: VocabLayout | None = None
        self._epochs_without_trainer = 0

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    @property
    def layout(self) -> VocabLayout:
        if self._layout is None:
            paths = [d.path for d in self.mixture + self.val_datasets]
            self._layout = VocabLayout(
                text_size=self.tokenizer.vocab_size,
                code_ranges=dict(self.code_ranges),
                code_layers=dict(self.code_layers),
                code_sources=code_sources(paths, self.code_ranges, self.code_layers, self.codecs),
                feature_sources={name: codec.fingerprint() for name, codec in self.codecs.items() if name not in self.code_ranges},
            )
        return self._layout

    def setup(self, stage: str | None = None) -> None:
        """Fail early on missing shards or tokenizer, not in a DataLoader worker."""
        for shard_set in self.mixture + self.val_datasets:
            expand_shards(shard_set.path, self.allow_pipe_urls)
        _ = self.tokenizer

    @property
    def processor(self) -> Processor:
        """What this data is encoded with; an export of a model trained on it saves it."""
        return Processor(
            self.tokenizer,
            self.layout,
            self.feature_dim,
            bidirectional=self.bidirectional,
            codecs=dict(self.codecs),
            input_layers=dict(self.input_layers),
            chat_template=get_template(self.chat_template),
            seq_len=self.seq_len,
        )

    def stream_config(self) -> StreamConfig:
        return StreamConfig(
            processor=self.processor,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            overlong=self.overlong,
            max_bad_fraction=self.max_bad_fraction,
        )

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _epoch(self) -> int:
        """The trainer's epoch (so a resumed run does not replay epoch 0), else a local count."""
        if self.trainer is not None:
            return self.trainer.current_epoch
        self._epochs_without_trainer += 1
        return self._epochs_without_trainer - 1

    def state_dict(self) -> dict[str, Any]:
        """The stream's position, and the vocabulary layout, which a resumed run's data must match
        (same tokenizers, same ranges)."""
        state = super().state_dict()
        return {**state, "vocab_layout": self.layout.to_dict()} if state else state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "vocab_layout" in state:
            saved = state["vocab_layout"]
            # a layout saved without feature_sources pins no continuous codec
            saved = saved if "feature_sources" in saved else {**saved, "feature_sources": self.layout.feature_sources}
            VocabLayout.from_dict(saved).check_compatible(self.layout, "the data")
        super().load_state_dict(state)

    def train_stream(self, rank: int = 0, world_size: int = 1) -> TrainStream:
        shard_sets = [expand_shards(d.path, self.allow_pipe_urls) for d in self.mixture]
        slots = world_size * max(1, self.num_workers)
        for spec, urls in zip(self.mixture, shard_sets):
            if len(urls) < slots:
                logger.warning(
                    "shard set %s has %d shards for %d rank x worker slots: slots share its shards "
                    "(in different orders); write more shards to give each slot its own",
                    spec.path,
                    len(urls),
                    slots,
                )
            elif len(urls) % slots:
                few = len(urls) // slots
                logger.warning(
                    "shard set %s has %d shards for %d rank x worker slots: some slots hold %d of them, others %d, "
                    "and every slot reads as many documents, so the documents of the former are read %.1fx as often; "
                    "write a multiple of %d shards",
                    spec.path, len(urls), slots, few, few + 1, (few + 1) / few, slots,
                )
        return TrainStream(
            shard_sets,
            [d.weight for d in self.mixture],
            self.stream_config(),
            self.steps_per_epoch * self.accumulate_grad_batches,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            shuffle_buffer=self.shuffle_buffer,
        )

    def make_train_dataloader(self, rank: int = 0, world_size: int = 1) -> WindowedLoader:
        """The train loader of one rank; ``train_dataloader`` calls it with the trainer's rank."""
        return WindowedLoader(
            self.train_stream(rank, world_size),
            window=self.accumulate_grad_batches,
            epoch=self._epoch,
            done=self._batches_done,
            num_workers=self.num_workers,
        )

    def make_val_dataloader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        shard_sets = [expand_shards(d.path, self.allow_pipe_urls) for d in self.val_datasets]
        stream = ValStream(shard_sets, self.stream_config(), self.val_batches, rank, world_size)
        # a generator of its own: each iterator draws a base seed from it, which from torch's global
        # one would move training's random stream at every validation (and a resume skips one)
        return DataLoader(stream, batch_size=None, generator=torch.Generator().manual_seed(0))

    def train_dataloader(self) -> WindowedLoader:
        return self.make_train_dataloader(*self._rank_and_world_size())

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_datasets:
            return []
        return self.make_val_dataloader(*self._rank_and_world_size())
