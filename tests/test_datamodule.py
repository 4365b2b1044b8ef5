"""The data module: shapes, determinism, rank splitting, mixture weights, windows, bad samples."""

from __future__ import annotations

import logging
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from unimodal.data.datamodule import ShardSet, UnimodalDataModule, worker_share
from unimodal.batch import PackedBatch
from unimodal.schema import Document, Part
from unimodal.data.shards import BadSamplePolicy, TooManyBadSamples, write_documents
from unimodal.training.bad_samples import BadSampleTally

FEATURES = 8
WORDS = "the cat sat on a mat and dog ran far away from home while birds sang songs in trees".split()


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> str:
    import sentencepiece as spm

    rng = np.random.default_rng(0)
    sentences = [" ".join(rng.choice(WORDS, 8)) for _ in range(200)]
    prefix = tmp_path_factory.mktemp("spm") / "tiny"
    ids = {"pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(prefix), vocab_size=64, model_type="bpe", minloglevel=2, **ids
    )
    return f"{prefix}.model"


def make_set(directory: Path, name: str, shards: int = 4, docs_per_shard: int = 10, seed: int = 0) -> str:
    """Text + continuous image features; ``meta["set"]`` tells documents' origin."""
    rng = np.random.default_rng(seed)
    docs = [
        Document(
            [
                Part("text", text=" ".join(rng.choice(WORDS, int(rng.integers(2, 8)))), role="user", loss=False),
                Part("image", media=0, data=rng.normal(size=(int(rng.integers(2, 6)), FEATURES)).astype(np.float32)),
                Part("text", text=" ".join(rng.choice(WORDS, int(rng.integers(2, 8)))), role="assistant"),
            ],
            meta={"set": name},
            key=f"{name}{i:04d}",
        )
        for i in range(shards * docs_per_shard)
    ]
    write_documents(docs, directory / name, max_docs_per_shard=docs_per_shard)
    return str(directory / name)


def module(datasets, tokenizer: str, **kwargs) -> UnimodalDataModule:
    kwargs = {"seq_len": 64, "batch_size": 2, "steps_per_epoch": 3, "feature_dim": FEATURES, "shuffle_buffer": 8} | kwargs
    dm = UnimodalDataModule(datasets, tokenizer, **kwargs)
    dm.setup("fit")
    return dm


def assert_same(a: PackedBatch, b: PackedBatch) -> None:
    for name, value in vars(a).items():
        other = getattr(b, name)
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, name


def test_batches_have_the_right_shapes(tmp_path, spm_model):
    dm = module([make_set(tmp_path, "a")], spm_model)
    assert dm.layout.text_size == 64 and dm.tokenizer.eos_id == 2
    batches = list(dm.make_train_dataloader())
    assert len(batches) == 3 == len(dm.make_train_dataloader())
    for batch in batches:
        assert isinstance(batch, PackedBatch)
        assert batch.input_ids.shape == (2, 64) and batch.input_ids.dtype == torch.long
        assert batch.features.shape == (int(batch.continuous_mask.sum()), FEATURES)
        assert batch.features.shape[0] > 0 and batch.num_label_tokens > 0
        assert int(batch.input_ids.max()) < dm.layout.size


def test_same_seed_same_batches_and_epochs_differ(tmp_path, spm_model):
    path = make_set(tmp_path, "a")
    first = list(module([path], spm_model).make_train_dataloader())
    again_loader = module([path], spm_model).make_train_dataloader()
    again = list(again_loader)
    for a, b in zip(first, again):
        assert_same(a, b)
    next_epoch = list(again_loader)
    assert not torch.equal(first[0].input_ids, next_epoch[0].input_ids)
    other_seed = next(iter(module([path], spm_model, seed=1).make_train_dataloader()))
    assert not torch.equal(first[0].input_ids, other_seed.input_ids)


def test_ranks_get_different_shards_and_the_same_number_of_batches(tmp_path, spm_model):
    dm = module([make_set(tmp_path, "a")], spm_model, steps_per_epoch=4)
    keys = [{d.key for _, d in zip(range(60), dm.train_stream(rank, 2).documents())} for rank in (0, 1)]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    batches = [list(dm.make_train_dataloader(rank, 2)) for rank in (0, 1)]
    assert len(batches[0]) == len(batches[1]) == 4
    assert not torch.equal(batches[0][0].input_ids, batches[1][0].input_ids)


def test_shards_that_do_not_split_evenly_over_the_slots_are_said_to_skew_the_documents(tmp_path, spm_model, caplog):
    dm = module([make_set(tmp_path, "a", shards=5)], spm_model, num_workers=2)
    reads = {}
    for rank in (0, 1):
        stream = dm.train_stream(rank, 2)
        for worker in (0, 1):
            for _, doc in zip(range(400), stream.documents(worker, 2)):
                shard = int(doc.key[1:]) // 10
                reads[shard] = reads.get(shard, 0) + 1
    assert reads[1] > 1.5 * reads[0]  # shards 0 and 4 share a slot: their documents are read half as often
    assert "others 2, and every slot reads as many documents" in caplog.text and "write a multiple of 4 shards" in caplog.text


def test_mixture_weights(tmp_path, spm_model):
    sets = [ShardSet(make_set(tmp_path, "a"), 0.9), {"path": make_set(tmp_path, "b", seed=1), "weight": 0.1}]
    docs = module(sets, spm_model).train_stream().documents()
    origins = [doc.meta["set"] for _, doc in zip(range(1000), docs)]
    assert 0.86 < origins.count("a") / len(origins) < 0.94


def test_window_label_tokens_with_workers(tmp_path, spm_model):
    dm = module([make_set(tmp_path, "a")], spm_model, steps_per_epoch=2, accumulate_grad_batches=3, num_workers=2)
    batches = list(dm.make_train_dataloader())
    assert len(batches) == 6
    for start in (0, 3):
        window = batches[start : start + 3]
        total = sum(b.num_label_tokens for b in window)
        assert all(b.window_label_tokens.dtype == torch.long and int(b.window_label_tokens) == total for b in window)
    again = module([tmp_path / "a"], spm_model, steps_per_epoch=2, accumulate_grad_batches=3, num_workers=2)
    for a, b in zip(batches, again.make_train_dataloader()):
        assert_same(a, b)


def truncate_first_member(path: Path) -> None:
    """Cut the tar inside its first member's data, so the shard yields no sample and one error."""
    with tarfile.open(path) as tar:
        first = tar.getmembers()[0]
    path.write_bytes(path.read_bytes()[: first.offset_data + first.size // 2])


def test_truncated_shard_is_skipped_and_counted(tmp_path, spm_model, caplog):
    path = make_set(tmp_path, "a")
    truncate_first_member(Path(path) / "shard-000002.tar")
    dm = module([path], spm_model, steps_per_epoch=10, max_bad_fraction=0.5)
    stream = dm.train_stream()
    with caplog.at_level(logging.WARNING, logger="unimodal.data"):
        assert len(list(stream)) == 10
    assert stream.policy.kinds["ShardError"] >= 1 and stream.policy.kinds["ShardError"] == stream.policy.skipped
    assert "shard-000002.tar: unreadable tar" in caplog.text

    # the stream only counts; the training process's tally applies the limit to the sum
    tally = BadSampleTally(0.01)
    with pytest.raises(TooManyBadSamples, match=r"too many bad samples: \d+ of \d+ skipped over every rank.*max_bad_fraction=0\.01; the last on this rank in .*shard-000002\.tar"):
        for batch in module([path], spm_model, steps_per_epoch=1000).make_train_dataloader():
            tally.add(batch, torch.device("cpu"))


def counts(read: int, skipped: int, shard: str = "") -> PackedBatch:
    batch = PackedBatch(*(torch.zeros(1, 1, dtype=torch.long),) * 8, features=torch.zeros(0, FEATURES))
    batch.samples_read, batch.samples_skipped, batch.skipped_from = torch.tensor(read), torch.tensor(skipped), shard
    return batch


def test_the_bad_sample_limit_applies_to_the_sum_over_workers(tmp_path, spm_model):
    """A training stream only counts: over its own share it may skip more than the limit allows.
    The tally decides on the sum of every worker's batches."""
    path = make_set(tmp_path, "a")
    truncate_first_member(Path(path) / "shard-000002.tar")
    stream = module([path], spm_model, steps_per_epoch=40, max_bad_fraction=0.01).train_stream()
    assert len(list(stream)) == 40 and stream.policy.skipped / stream.policy.seen > 0.01

    tally, cpu = BadSampleTally(0.02), torch.device("cpu")
    for _ in range(10):  # worker 0: 10% bad; worker 1: none; 1% over both
        tally.add(counts(10, 1, "w0.tar"), cpu)
        tally.add(counts(90, 0), cpu)
    assert tally.totals(cpu) == (1000, 10)
    with pytest.raises(TooManyBadSamples, match=r"31 of 1030 skipped .*\(3\.0%, max_bad_fraction=0\.02; the last on this rank in w0\.tar\)"):
        tally.add(counts(30, 21), cpu)


def _tally_on_rank(rank: int, store: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    tally, cpu = BadSampleTally(0.02, every=2), torch.device("cpu")
    try:  # summed at every second batch
        tally.add(counts(500, 15 if rank == 0 else 0, "r0.tar" if rank == 0 else ""), cpu)
        tally.add(counts(0, 0), cpu)  # 15 of 1000
        results.put((rank, "went on"))
        tally.add(counts(100, 0 if rank == 0 else 30, "" if rank == 0 else "r1.tar"), cpu)
        tally.add(counts(0, 0), cpu)  # 45 of 1200
        results.put((rank, "went on"))
    except TooManyBadSamples as err:
        results.put((rank, str(err)))
    finally:
        dist.destroy_process_group()


def test_ranks_sum_their_bad_samples_and_stop_at_the_same_step(tmp_path):
    """With a limit of 2%, rank 0 alone would stop at the first step (3% bad) and go on alone at
    the second; the sums (1.5%, then 3.75%) stop both ranks at the second, each naming its own
    last bad shard."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ranks = [context.Process(target=_tally_on_rank, args=(rank, str(tmp_path / "store"), results)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(120)
    said = sorted(results.get(timeout=5) for _ in range(4))
    assert [rank for rank, _ in said] == [0, 0, 1, 1]
    assert [rank for rank, text in said if text == "went on"] == [0, 1]
    stops = [text for _, text in said if text != "went on"]
    assert len(stops) == 2 and all("45 of 1200 skipped over every rank" in text for text in stops)
    assert "last on this rank in r0.tar" in stops[0] and "last on this rank in r1.tar" in stops[1]


def test_a_stream_of_nothing_but_bad_samples_stops_by_itself():
    """A training stream never applies the fraction itself, but one that finds no good sample
    would never yield a batch to report its count: it stops after ``STALLED`` in a row."""
    policy = BadSamplePolicy(0.01, enforce=False)
    for _ in range(BadSamplePolicy.STALLED - 1):
        policy.skip("bad", "k", "s.tar")
    policy.ok()  # a good one resets the run of bad ones
    for _ in range(BadSamplePolicy.STALLED - 1):
        policy.skip("bad", "k", "s.tar")
    with pytest.raises(TooManyBadSamples, match=f"{BadSamplePolicy.STALLED} bad samples in a row, the last in s.tar"):
        policy.skip("bad", "k", "s.tar")


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_sample_counts_reach_the_training_process_from_every_worker(tmp_path, spm_model, workers):
    """Each batch carries the samples its stream read and skipped since the previous one, so the
    sums over the loader's batches are the counts of every worker's own policy."""
    path = make_set(tmp_path, "a")
    truncate_first_member(Path(path) / "shard-000002.tar")
    dm = module([path], spm_model, steps_per_epoch=8, max_bad_fraction=0.5, num_workers=workers)
    batches = list(dm.make_train_dataloader())
    skipped, read = sum(int(b.samples_skipped) for b in batches), sum(int(b.samples_read) for b in batches)
    # each worker's stream again, in this process: the same documents, so the same skips
    stream, slots = dm.train_stream(), max(workers, 1)
    expected_read = expected_skipped = 0
    for worker in range(slots):
        stream.policy = policy = BadSamplePolicy(0.5)
        list(islice(stream.config.batches(stream.documents(worker, slots), policy), worker_share(stream.batches, worker, slots)))
        expected_read, expected_skipped = expected_read + policy.seen, expected_skipped + policy.skipped
    assert skipped >= 1 and (skipped, read) == (expected_skipped, expected_read)


def test_a_run_reports_its_bad_samples_in_one_line(tmp_path, spm_model, tiny_llama_config, caplog):
    import lightning as L

    from unimodal.models.backbone import BackboneConfig
    from unimodal.models.unified import LinearAdapter
    from unimodal.training.module import UnimodalModule

    path = make_set(tmp_path, "a")
    truncate_first_member(Path(path) / "shard-000002.tar")
    dm = module([path], spm_model, steps_per_epoch=4, max_bad_fraction=0.5, num_workers=2)
    model = UnimodalModule(backbone=BackboneConfig(config=tiny_llama_config, attention="sdpa"), vocab=dm.layout.to_dict(),
                           continuous={"image": lambda hidden: LinearAdapter(hidden, FEATURES)})
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="unimodal.train"):
        trainer.fit(model, datamodule=dm)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: skipped")]
    skipped, read = (int(word) for word in line.split() if word.isdigit())
    assert 1 <= skipped < read and "every rank and worker" in line


def test_validation_is_deterministic_and_equal_per_rank(tmp_path, spm_model):
    train, val = make_set(tmp_path, "a"), make_set(tmp_path, "v", seed=3)
    dm = module([train], spm_model, val_datasets=[val], val_batches=3)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first, again = list(dm.val_dataloader()), list(dm.val_dataloader())
    torch.testing.assert_close(torch.rand(3), expected)  # validating draws nothing from training's stream
    assert len(first) == 3
    for a, b in zip(first, again):
        assert_same(a, b)
        assert int(a.window_label_tokens) == a.num_label_tokens
    ranks = [list(dm.make_val_dataloader(rank, 2)) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    assert_same(ranks[0][0], first[0]) and not torch.equal(ranks[1][0].input_ids, first[0].input_ids)
    assert module([train], spm_model).val_dataloader() == []


def test_trainer_steps_and_epochs(tmp_path, spm_model):
    """Under Lightning: optimizer steps = steps_per_epoch per epoch, and each epoch reads new data."""
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self, vocab: int):
            super().__init__()
            self.embedding = torch.nn.Embedding(vocab, 4)
            self.seen: list[tuple[int, torch.Tensor]] = []

        def training_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor:
            self.seen.append((self.current_epoch, batch.input_ids))
            return self.embedding(batch.input_ids).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = module([make_set(tmp_path, "a")], spm_model, steps_per_epoch=2, accumulate_grad_batches=2)
    probe = Probe(dm.layout.size)
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
    trainer = L.Trainer(max_epochs=2, accumulate_grad_batches=2, accelerator="cpu", **quiet)
    trainer.fit(probe, datamodule=dm)
    assert trainer.global_step == 4 and len(probe.seen) == 8
    assert not torch.equal(probe.seen[0][1], probe.seen[4][1]) and probe.seen[4][0] == 1


def test_config_parses_with_jsonargparse(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(UnimodalDataModule, "data")
    config = parser.parse_args(
        ["--data.datasets=[{path: a, weight: 0.9}, b]", "--data.tokenizer=t.model", "--data.bidirectional=[image]"]
    )
    dm = parser.instantiate_classes(config).data
    assert [(d.path, d.weight) for d in dm.datasets] == [("a", 0.9), ("b", 1.0)] and dm.bidirectional == ("image",)
