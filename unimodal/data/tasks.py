"""What a document teaches: its task, named by the media it is given and the media it must write.

A fine-tune that covers only some of a model's tasks wears the others away; naming tasks by
modalities (``image -> text`` for a caption, ``text -> audio`` for speech, ``document
image+text`` for plain interleaved data) needs no labels in the data and tells the user which
skills their new data leaves out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

from unimodal.data.shards import BadSamplePolicy, expand_shards, read_documents
from unimodal.schema import Document


def document_task(doc: Document) -> str:
    """``given -> written`` from the parts' loss flags (a chat: the user's media, then the
    assistant's); a document supervised throughout is ``document`` plus its media."""
    given = sorted({p.type for p in doc.parts if not p.loss})
    written = sorted({p.type for p in doc.parts if p.loss})
    if not given:
        return "document " + "+".join(written)
    return f"{'+'.join(given)} -> {'+'.join(written) or 'nothing'}"


def documents_of(paths: Iterable[str], limit: int, decode: bool = False, allow_pipe: bool = False) -> Iterator[Document]:
    """Up to ``limit`` documents from the start of each shard set (bad samples skipped);
    ``allow_pipe`` as the recipe's ``data.init_args.allow_pipe_urls``."""
    policy = BadSamplePolicy(max_bad_fraction=1.0)
    for path in paths:
        count = 0
        for doc in read_documents(expand_shards(path, allow_pipe), decode=decode, policy=policy):
            yield doc
            count += 1
            if count >= limit:
                break


def sample_tasks(paths: Iterable[str], per_set: int = 256, allow_pipe: bool = False) -> Counter[str]:
    """Task counts over the first ``per_set`` documents of each shard set."""
    return Counter(document_task(doc) for doc in documents_of(paths, per_set, allow_pipe=allow_pipe))
