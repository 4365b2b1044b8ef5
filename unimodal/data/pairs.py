"""Image-caption pairs from weighted shard sets: the data of the SEED tokenizer stages."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from unimodal.data.datamodule import EpochLoader, ResumableDataModule, ShardSet, StreamConfig, TrainStream, shard_sets, worker_share, worker_slot
from unimodal.data.processor import Processor
from unimodal.data.shards import BadSamplePolicy, expand_shards
from unimodal.data.tokenizer import TextTokenizer, load_tokenizer
from unimodal.modalities.image_continuous import center_crop
from unimodal.modalities.vocab import VocabLayout
from unimodal.schema import Document, local_path

# documents read in a row without a raw image before a mixture counts as having none: the stream
# draws forever, so a text-only or pre-encoded set would otherwise hang the run
MAX_DOCS_WITHOUT_IMAGE = 1000


def _pair(doc: Document, size: int) -> tuple[np.ndarray, str] | None:
    """The first raw image of a document, centre-cropped to ``size``, and the document's text."""
    image = next((p.data for p in doc.parts if p.type == "image" and isinstance(p.data, np.ndarray) and p.data.dtype == np.uint8), None)
    if image is None:
        return None
    return center_crop(image, size), " ".join(p.text or "" for p in doc.parts if p.type == "text").strip()


class PairStream(IterableDataset):
    """Batches ``{"images": uint8 [B, S, S, 3], "text_ids": [B, L], "text_mask": [B, L]}`` from the mixture."""

    def __init__(self, stream: TrainStream, tokenizer: TextTokenizer, image_size: int, max_text_tokens: int, batch_size: int):
        self.stream, self.tokenizer = stream, tokenizer
        self.image_size, self.max_text_tokens, self.batch_size = image_size, max_text_tokens, batch_size

    def __len__(self) -> int:
        return self.stream.batches

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    @epoch.setter
    def epoch(self, epoch: int) -> None:  # what EpochLoader sets before each pass
        self.stream.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = worker_slot()
        # only counted here: the training process applies the limit to every worker's and rank's sum
        policy = self.stream.policy = BadSamplePolicy(self.stream.config.max_bad_fraction, enforce=False)
        docs = self.stream.documents(worker, workers)
        read = skipped = 0
        for _ in range(worker_share(self.stream.batches, worker, workers)):
            pairs: list[tuple[np.ndarray, str]] = []
            misses = 0
            while len(pairs) < self.batch_size:
                doc = next(docs)
                policy.ok()
                pair = _pair(doc, self.image_size)
                if pair is not None:
                    pairs.append(pair)
                    misses = 0
                elif (misses := misses + 1) >= MAX_DOCS_WITHOUT_IMAGE:
                    raise ValueError(
                        f"{misses} documents in a row hold no raw image: image-caption pairs need shards with raw "
                        "images (not text-only ones, nor ones whose images `unimodal data encode` turned into codes)"
                    )
            batch = self._collate(pairs)
            batch.update(samples_read=policy.seen - read, samples_skipped=policy.skipped - skipped,
                         skipped_from=policy.last_shard if policy.skipped > skipped else "")
            read, skipped = policy.seen, policy.skipped
            yield batch

    def _collate(self, pairs: list[tuple[np.ndarray, str]]) -> dict[str, Any]:
        ids = torch.full((len(pairs), self.max_text_tokens), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for row, (_, text) in enumerate(pairs):
            tokens = self.tokenizer.encode(text)[: self.max_text_tokens] or [self.tokenizer.eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = True
        images = torch.from_numpy(np.stack([image for image, _ in pairs]))
        return {"images": images, "text_ids": ids, "text_mask": mask}


class ImageTextPairs(ResumableDataModule):
    """Image-caption pairs from weighted shard sets: each document's first raw image and its text.

    ``layout`` is the caption tokenizer's (text only); ``unimodal train`` links it to the model's
    ``vocab``, which sizes stage 1's text encoder. ``max_bad_fraction`` stops the run when more
    of the samples read than that are broken (summed over workers and ranks), as in
    :class:`~unimodal.data.UnimodalDataModule`.
    """

    def __init__(
        self,
        datasets: list[ShardSet | str],
        tokenizer: str,
        image_size: int = 224,
        max_text_tokens: int = 32,
        batch_size: int = 64,
        steps_per_epoch: int = 1000,
        accumulate_grad_batches: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 256,
        max_bad_fraction: float = 0.01,
    ):
        super().__init__()
        self.datasets = shard_sets(datasets)
        if not self.datasets:
            raise ValueError("datasets: give at least one shard set")
        self.tokenizer_path = local_path(tokenizer)
        self.image_size, self.max_text_tokens, self.batch_size = image_size, max_text_tokens, batch_size
        self.steps_per_epoch, self.accumulate_grad_batches = steps_per_epoch, accumulate_grad_batches
        self.num_workers, self.seed, self.shuffle_buffer = num_workers, seed, shuffle_buffer
        self.max_bad_fraction = max_bad_fraction
        self._tokenizer: TextTokenizer | None = None

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    @property
    def layout(self) -> VocabLayout:
        return VocabLayout(text_size=self.tokenizer.vocab_size)

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        config = StreamConfig(Processor(self.tokenizer, self.layout), seq_len=1, batch_size=self.batch_size,
                              max_bad_fraction=self.max_bad_fraction)
        stream = TrainStream(
            [expand_shards(d.path) for d in self.datasets], [d.weight for d in self.datasets], config,
            self.steps_per_epoch * self.accumulate_grad_batches, seed=self.seed, rank=rank, world_size=world,
            shuffle_buffer=self.shuffle_buffer,
        )
        pairs = PairStream(stream, self.tokenizer, self.image_size, self.max_text_tokens, self.batch_size)
        epoch = lambda: self.trainer.current_epoch if self.trainer is not None else 0  # noqa: E731
        return EpochLoader(pairs, epoch, self._batches_done, num_workers=self.num_workers)
