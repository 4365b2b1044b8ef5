"""The one packer: encoded documents into fixed-length sequences.

Every sequence carries per-position document ids (0 = padding), positions that restart at each
document, bidirectional block ids, and labels already shifted so that ``labels[t]`` is the id
predicted from position ``t``. The attention mask is derived from these ids by the model
(``unimodal.models.attention``), so attention never crosses documents.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from unimodal.batch import IGNORE_INDEX, PackedBatch
from unimodal.data.processor import EncodedDocument


class DocumentTooLong(ValueError):
    pass


@dataclass
class Packer:
    seq_len: int
    pad_id: int
    feature_dim: int = 0
    # "split": cut long documents at span boundaries; "error": refuse them
    overlong: Literal["split", "error"] = "split"
    # how many partly filled sequences stay open for best-fit placement
    open_sequences: int = 16
    # the shortest piece a document that is cut anyway may begin with, to fill a gap
    min_first_piece: int = 16

    def pack(self, docs: Iterable[EncodedDocument]) -> Iterator[dict[str, np.ndarray]]:
        """Yield packed sequences (dicts of numpy arrays) in a deterministic order.

        Best fit over the open sequences: a piece goes to the fullest one it fits in; a full
        sequence is emitted at once; when a piece fits nowhere and every slot is taken, the
        fullest sequence is emitted to make room (it wastes the least padding). A document that
        must be cut anyway begins with a piece that fills the smallest gap of at least
        ``min_first_piece`` positions: documents about as long as the sequences otherwise leave
        gaps that only short documents could fill (text at 256 positions: 0.963 of the positions
        used without it, 0.995 with it, benchmarks/README.md).
        """
        bins: list[list[EncodedDocument]] = []
        fill: list[int] = []
        for doc in docs:
            gaps = [self.seq_len - used for used in fill if self.seq_len - used >= self.min_first_piece]
            first = min(gaps) if gaps and len(doc) > self.seq_len else self.seq_len
            for piece in self.pieces(doc, first):
                fitting = [i for i, used in enumerate(fill) if used + len(piece) <= self.seq_len]
                if fitting:
                    slot = max(fitting, key=fill.__getitem__)
                else:
                    if len(bins) == self.open_sequences:
                        fullest = max(range(len(fill)), key=fill.__getitem__)
                        yield self._emit(bins.pop(fullest))
                        fill.pop(fullest)
                    bins.append([])
                    fill.append(0)
                    slot = len(bins) - 1
                bins[slot].append(piece)
                fill[slot] += len(piece)
                if fill[slot] == self.seq_len:
                    yield self._emit(bins.pop(slot))
                    fill.pop(slot)
        for docs_in_bin in bins:
            yield self._emit(docs_in_bin)

    def pieces(self, doc: EncodedDocument, first: int | None = None) -> list[EncodedDocument]:
        """The pieces ``doc`` is packed as: itself, or cuts at span boundaries, the first piece at
        most ``first`` positions (a gap to fill; the next cut is then ``seq_len`` later, and when a
        media span would leave it shorter than ``min_first_piece`` the cuts fall at ``seq_len``); raises
        ``DocumentTooLong`` where it cannot be cut (or ``overlong`` is ``error``)."""
        if len(doc) <= self.seq_len:
            return [doc]
        if self.overlong == "error":
            raise DocumentTooLong(
                f"document {doc.key!r} has {len(doc)} tokens, more than seq_len={self.seq_len} "
                "(set overlong: split to cut it at span boundaries)"
            )
        pieces, start = [], 0
        media = doc.modality != 0
        inside = media if doc.span_start is None else media & ~doc.span_start  # a media position a cut must not precede
        while start < len(doc):
            room = first if start == 0 and first else self.seq_len
            stop = min(start + room, len(doc))
            if stop < len(doc):
                # never cut through a media span: move the cut back to where the span starts
                while stop > start and media[stop - 1] and inside[stop]:
                    stop -= 1
                if room < self.seq_len and stop - start < min(room, self.min_first_piece):
                    return self.pieces(doc)
                if stop == start:
                    raise DocumentTooLong(
                        f"document {doc.key!r}: a media span longer than seq_len={self.seq_len} cannot be split"
                    )
            pieces.append(_slice(doc, start, stop))
            start = stop
        return pieces

    def _emit(self, docs: list[EncodedDocument]) -> dict[str, np.ndarray]:
        n = self.seq_len
        out = {
            "input_ids": np.full(n, self.pad_id, np.int64),
            "modality_ids": np.zeros(n, np.int64),
            "position_ids": np.zeros(n, np.int64),
            "doc_ids": np.zeros(n, np.int64),
            "block_ids": np.full(n, -1, np.int64),
            "labels": np.full(n, IGNORE_INDEX, np.int64),
            "target_mask": np.zeros(n, bool),
            "continuous_mask": np.zeros(n, bool),
        }
        features, cursor, blocks = [], 0, 0
        for number, doc in enumerate(docs, start=1):
            end = cursor + len(doc)
            window = slice(cursor, end)
            out["input_ids"][window] = doc.ids
            out["modality_ids"][window] = doc.modality
            out["position_ids"][window] = np.arange(len(doc))
            out["doc_ids"][window] = number
            out["block_ids"][window] = np.where(doc.block >= 0, doc.block + blocks, -1)
            blocks += int(doc.block.max(initial=-1)) + 1
            out["target_mask"][window] = doc.target
            out["continuous_mask"][window] = doc.continuous
            # labels[t] = ids[t+1] where t+1 is a discrete target of the same document
            discrete_target = doc.target[1:] & ~doc.continuous[1:]
            out["labels"][cursor : end - 1] = np.where(discrete_target, doc.ids[1:], IGNORE_INDEX)
            features.append(doc.features)
            cursor = end
        out["features"] = (
            np.concatenate(features).astype(np.float32) if features else np.zeros((0, self.feature_dim), np.float32)
        )
        return out


def _slice(doc: EncodedDocument, start: int, stop: int) -> EncodedDocument:
    first_feature = int(doc.continuous[:start].sum())
    n_features = int(doc.continuous[start:stop].sum())
    block = doc.block[start:stop]
    if (block >= 0).any():
        block = np.where(block >= 0, block - block[block >= 0].min(), -1)
    return EncodedDocument(
        ids=doc.ids[start:stop],
        modality=doc.modality[start:stop],
        target=doc.target[start:stop],
        block=block,
        continuous=doc.continuous[start:stop],
        features=doc.features[first_feature : first_feature + n_features],
        key=f"{doc.key}#{start}",
        span_start=None if doc.span_start is None else doc.span_start[start:stop],
    )


def collate(sequences: list[dict[str, np.ndarray]]) -> PackedBatch:
    stacked = {
        name: torch.from_numpy(np.stack([s[name] for s in sequences]))
        for name in sequences[0]
        if name != "features"
    }
    features = torch.from_numpy(np.concatenate([s["features"] for s in sequences]))
    return PackedBatch(features=features, **stacked)
