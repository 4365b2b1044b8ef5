"""Shards: packing a source JSONL, reading it back, bad input, bad samples, inspecting."""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from unimodal.schema import Document, DocumentError, Part
from unimodal.data.inspect import inspect_path
from unimodal.data.jsonl import EmptyOutput, pack_jsonl
from unimodal.data.media import MediaBytes
from unimodal.data.shards import BadSamplePolicy, ShardError, TooManyBadSamples, iter_samples, read_documents, write_documents


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A source JSONL with text, a png, a flac, float features and integer codes."""
    rng = np.random.default_rng(0)
    media = tmp_path / "media"
    media.mkdir()
    Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(media / "a.png")
    soundfile.write(media / "b.flac", rng.uniform(-0.5, 0.5, 1600).astype(np.float32), 16000)
    np.save(media / "feat.npy", rng.normal(size=(4, 8)).astype(np.float32))
    np.save(tmp_path / "codes.npy", np.arange(5, dtype=np.int64))
    lines = [
        {
            "key": "doc-a",
            "parts": [
                {"type": "text", "text": "Describe this.", "role": "user", "loss": False},
                {"type": "image", "path": "media/a.png", "role": "user", "loss": False},
                {"type": "text", "text": "A noisy picture " * 10, "role": "assistant"},
            ],
            "meta": {"origin": "test"},
        },
        {
            "parts": [
                {"type": "text", "text": "listen"},
                {"type": "audio", "path": "media/b.flac"},
                {"type": "image", "path": "media/feat.npy"},
                {"type": "image", "path": str(tmp_path / "codes.npy")},
            ]
        },
    ]
    src = tmp_path / "src.jsonl"
    src.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n")
    return src


def test_pack_and_read_back(source: Path, tmp_path: Path):
    out = tmp_path / "out"
    stats = pack_jsonl(source, out, max_docs_per_shard=1, progress=False)

    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk == stats
    assert stats["schema"] == "unimodal.document/1" and stats["documents"] == 2
    assert stats["shards"] == [{"name": "shard-000000.tar", "documents": 1}, {"name": "shard-000001.tar", "documents": 1}]
    mods = stats["modalities"]
    assert mods["text"] == {"parts": 3, "characters": len("Describe this.") + 160 + len("listen")}
    assert mods["image"]["parts"] == 3 and mods["audio"]["parts"] == 1
    assert mods["audio"]["bytes"] == (source.parent / "media/b.flac").stat().st_size

    raw = list(read_documents(out, decode=False))
    assert [d.key for d in raw] == ["doc-a", "00000003"]  # keys default to the line number
    assert raw[0].meta == {"origin": "test"}
    assert [(p.type, p.role, p.loss, p.media) for p in raw[0].parts] == [
        ("text", "user", False, None),
        ("image", "user", False, 0),
        ("text", "assistant", True, None),
    ]
    assert raw[0].parts[1].data == MediaBytes("png", (source.parent / "media/a.png").read_bytes())
    assert [p.media for p in raw[1].parts] == [None, 0, 1, 2]

    docs = list(read_documents(str(out / "shard-{000000..000001}.tar")))
    image = docs[0].parts[1].data
    assert image.dtype == np.uint8 and image.shape == (6, 8, 3)
    assert np.array_equal(image, np.asarray(Image.open(source.parent / "media/a.png")))
    waveform, rate = docs[1].parts[1].data
    expected, _ = soundfile.read(source.parent / "media/b.flac", dtype="float32")
    assert rate == 16000 and waveform.dtype == np.float32 and np.array_equal(waveform, expected)
    assert np.array_equal(docs[1].parts[2].data, np.load(source.parent / "media/feat.npy"))
    assert np.array_equal(docs[1].parts[3].data, np.arange(5))
    assert docs[0].parts[2].text == "A noisy picture " * 10


def test_rewriting_read_documents_gives_identical_shards(source: Path, tmp_path: Path):
    pack_jsonl(source, tmp_path / "a", progress=False)
    write_documents(read_documents(tmp_path / "a", decode=False), tmp_path / "b")
    assert (tmp_path / "a/shard-000000.tar").read_bytes() == (tmp_path / "b/shard-000000.tar").read_bytes()


def test_inspect(source: Path, tmp_path: Path):
    out = tmp_path / "out"
    pack_jsonl(source, out, max_docs_per_shard=1, progress=False)
    text = inspect_path(out, n=5)
    expected = ["documents: 2", "shards: 2", "doc-a", "00000003", "uint8 6x8x3", "0.10 s at 16000 Hz"]
    expected += ["float32 4x8", "int64 5", "Describe this.", "user loss=false", '"origin": "test"']
    for line in expected:
        assert line in text, line
    assert "A noisy picture A noisy" in text and "A noisy picture " * 10 not in text  # truncated text

    single = inspect_path(out / "shard-000001.tar")
    assert "documents: 1" in single and "counted from the shards" in single and "00000003" in single
    summary = inspect_path(out, n=0)  # the summary alone, read from stats.json
    assert "doc-a" not in summary and "first 0 documents" not in summary

    (out / "stats.json").write_text('{"documents": 2')  # a copy cut short
    with pytest.raises(ValueError, match=r"stats.json is not valid JSON .*delete it to have them counted"):
        inspect_path(out)
    for other in ("{}", '{"documents": "x", "modalities": {}}', '{"documents": 2, "modalities": {"text": 5}}'):
        (out / "stats.json").write_text(other)
        with pytest.raises(ValueError, match=r"stats.json lacks the counts .*delete it to have them counted"):
            inspect_path(out)


def test_data_inspect_takes_builtin_names(capsys):
    from unimodal.cli import main

    assert main(["data", "inspect", "builtin:shapes/train", "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "documents: 512" in out and "first 1 document:" in out


def _write_source(tmp_path: Path, lines: list[str]) -> Path:
    src = tmp_path / "src.jsonl"
    src.write_bytes(("\n".join(lines) + "\n").encode().replace(rb"\xe9", b"\xe9"))  # a Latin-1 byte where a test asks
    return src


GOOD = json.dumps({"parts": [{"type": "text", "text": "fine"}]})


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"parts": [', r"src\.jsonl:2: malformed JSON"),
        (json.dumps({"parts": [{"type": "image", "path": "nope.png"}]}), r"src\.jsonl:2: image file 'nope.png' not found"),
        (json.dumps({"key": "a.b", "parts": [{"type": "text", "text": "x"}]}), r"src\.jsonl:2: invalid sample key 'a\.b'.*dot"),
        (json.dumps({"parts": [{"type": "video", "path": "v.mp4"}]}), r"src\.jsonl:2: part 0 has type 'video'"),
        (json.dumps({"parts": [{"type": "audio", "path": "x.txt"}]}), r"src\.jsonl:2: audio file 'x.txt' has extension"),
        (json.dumps({"key": "00000001", "parts": [{"type": "text", "text": "x"}]}), r"duplicate key '00000001'"),
        (json.dumps({"message": [{"role": "user", "content": "hi"}]}), r"src\.jsonl:2: unknown field 'message' \(did you mean 'messages'\?\)"),
        # a typo that a reader would ignore, training on what was meant as context
        (json.dumps({"parts": [{"type": "text", "text": "x", "lossy": False}]}), r"src\.jsonl:2: part 0: unknown field 'lossy' \(did you mean 'loss'\?\)"),
        (json.dumps({"parts": [{"type": "text", "text": "x", "colour": 1}]}), r"part 0: unknown field 'colour' \(known: type, text, role, loss\)"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weigth": 0}]}),
         r"src\.jsonl:2: message 1: unknown field 'weigth' \(did you mean 'weight'\?\)"),
        (json.dumps({"parts": [{"type": "text", "text": "x"}], "metа": {}}), r"src\.jsonl:2: unknown field 'metа' \(did you mean 'meta'\?\)"),
        (json.dumps({"schema": "unimodal.document/2", "parts": [{"type": "text", "text": "x"}]}), r"schema 'unimodal.document/2' is not supported"),
        (json.dumps({"key": 5, "parts": [{"type": "text", "text": "x"}]}), r"src\.jsonl:2: 'key' must be a string, got 5"),
        (json.dumps({"key": "a\u0000b", "parts": [{"type": "text", "text": "x"}]}), r"src\.jsonl:2: invalid sample key 'a\\x00b': keys hold no control"),
        (json.dumps({"kye": "a", "parts": [{"type": "text", "text": "x"}]}), r"src\.jsonl:2: unknown field 'kye' \(did you mean 'key'\?\)"),
        (json.dumps({"Key": "a", "parts": [{"type": "text", "text": "x"}]}), r"src\.jsonl:2: unknown field 'Key' \(did you mean 'key'\?\)"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "parts": [{"type": "text", "text": "a"}]}),
         r"src\.jsonl:2: a line has both 'messages' \(a chat\) and 'parts' \(a document\); give one of them"),
        (json.dumps({"parts": None}), r"src\.jsonl:2: 'parts' must be a non-empty list"),
        (json.dumps({"parts": [{"type": "image", "path": "folder.png"}]}), r"src\.jsonl:2: image file 'folder.png' is a directory, not a regular file"),
        (json.dumps({"parts": [{"type": "image", "path": "zero.png"}]}), r"src\.jsonl:2: image file 'zero.png' is a device or socket, not a regular"),
        (json.dumps({"parts": [{"type": "image", "path": "https://x.org/a.png"}]}), r"src\.jsonl:2: image 'https://x.org/a.png' is remote"),
        (json.dumps({"parts": [{"type": "image", "path": "a" * 5000 + ".png"}]}),
         r"src\.jsonl:2: image file 'a{200}'\.\.\. \(5004 characters\) cannot be read \(File name too long\)"),
        (json.dumps({"parts": [{"type": "image", "path": "huge.npy"}]}), r"src\.jsonl:2: image file 'huge.npy' is 600 MiB, over the 512 MiB a media file may have"),
        (json.dumps({"parts": [{"type": "image", "path": "a\u0000b.png"}]}), r"src\.jsonl:2: image file 'a\\x00b.png' cannot be read \(embedded null byte\)"),
        (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]}),
         r"src\.jsonl:2: message 0: image data URL of type image/png is not a \.png file \(it starts with b'hello'\)"),
        (r'{"parts": [{"type": "text", "text": "caf\xe9"}]}', r"src\.jsonl:2: not UTF-8 \(byte 0xe9 at column 41\); save the file as UTF-8"),
        # what Python's parser would take, or fail on in its own way, is one malformed line too
        ('{"parts": [], "meta": ' + "[" * 100_000 + "]" * 100_000 + "}", r"src\.jsonl:2: malformed JSON \(arrays or objects nested too deeply\)"),
        ('{"parts": [], "meta": {"n": 1' + "0" * 5000 + "}}", r"src\.jsonl:2: malformed JSON \(an integer has more than 4300 digits\)"),
        ('{"parts": [{"type": "text", "text": "\\ud800"}]}', r"src\.jsonl:2: malformed JSON \(a string holds a lone surrogate \(\\ud800\)"),
        ('{"parts": [{"type": "text", "text": "x"}], "meta": {"score": NaN}}', r"src\.jsonl:2: malformed JSON \(NaN is not a JSON number\)"),
        ('{"parts": [{"type": "text", "text": "x"}], "parts": [{"type": "text", "text": "y"}]}',
         r"src\.jsonl:2: malformed JSON \(the key 'parts' is given twice in one object\)"),
    ],
)
def test_bad_source_line_names_file_and_line(tmp_path: Path, bad_line: str, message: str):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    (tmp_path / "x.txt").write_text("words")
    with open(tmp_path / "huge.npy", "wb") as sparse:  # 600 MiB that take no disk
        sparse.truncate(600 * 2**20)
    src = _write_source(tmp_path, [GOOD, bad_line, GOOD])
    with pytest.raises(DocumentError, match=message):
        pack_jsonl(src, tmp_path / "out", max_docs_per_shard=1, progress=False)
    assert not list((tmp_path / "out").glob("*.tar"))  # partial shards are removed
    stats = pack_jsonl(src, tmp_path / "out", skip_bad=True, progress=False)
    assert stats["documents"] == 2 and stats["source"]["skipped"] == 1
    assert "src.jsonl:2" in stats["source"]["skipped_examples"][0]


def test_a_source_line_too_long_to_hold_is_refused_without_being_read_whole(tmp_path: Path, monkeypatch):
    """A line with no newline in gigabytes would be read whole into memory before any check."""
    from unimodal.data import jsonl

    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 2**20)
    src = _write_source(tmp_path, [GOOD, json.dumps({"parts": [{"type": "text", "text": "x" * 3 * 2**20}]}), GOOD])
    read = []
    real = jsonl.bounded_lines
    monkeypatch.setattr(jsonl, "bounded_lines", lambda file, limit: (read.append(line) or (line, size) for line, size in real(file, limit)))
    with pytest.raises(DocumentError, match=r"^src.jsonl:2: the line is longer than 1 MiB; a document names its media by path"):
        pack_jsonl(src, tmp_path / "out", progress=False)
    stats = pack_jsonl(src, tmp_path / "out", skip_bad=True, progress=False)
    assert stats["documents"] == 2 and stats["source"]["skipped"] == 1
    assert all(line is None or len(line) <= 2**20 + 1 for line in read)


def test_skip_bad_prints_summary(tmp_path: Path, capsys):
    src = _write_source(tmp_path, [GOOD, "not json", GOOD, "{]"])
    stats = pack_jsonl(src, tmp_path / "out", skip_bad=True, progress=False)
    err = capsys.readouterr().err
    assert "skipped 2 of 4 documents" in err and "src.jsonl:2: malformed JSON" in err and "src.jsonl:4:" in err
    assert json.loads((tmp_path / "out/stats.json").read_text())["source"]["skipped"] == 2
    assert [d.key for d in read_documents(tmp_path / "out")] == ["00000001", "00000003"]
    assert stats["documents"] == 2
    # with a validation split the source is read once per split: its bad lines are listed once
    pack_jsonl(src, tmp_path / "split-out", skip_bad=True, progress=False, val_fraction=0.5)
    err = capsys.readouterr().err
    assert err.count("skipped 2 of 4 documents") == 1 and err.count("src.jsonl:2: malformed JSON") == 1


def test_write_refuses_dotted_keys_and_existing_shards(tmp_path: Path):
    with pytest.raises(DocumentError, match="no '.'"):
        write_documents([Document([Part("text", text="x")], key="a.b")], tmp_path / "out")
    write_documents([Document([Part("text", text="x")], key="a")], tmp_path / "out")
    with pytest.raises(FileExistsError, match="already holds shards"):
        write_documents([Document([Part("text", text="x")], key="b")], tmp_path / "out")
    (tmp_path / "out" / "stats.json").unlink()  # as a pack killed before its end leaves them
    with pytest.raises(FileExistsError, match=r"and no stats.json \(if they are left from a pack that did not finish, delete them\)"):
        write_documents([Document([Part("text", text="x")], key="b")], tmp_path / "out")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "stats.json").write_text('{"my": "notes"}')
    with pytest.raises(FileExistsError, match="mine already holds stats.json; write to an empty directory"):
        write_documents([Document([Part("text", text="x")], key="b")], tmp_path / "mine")
    assert (tmp_path / "mine" / "stats.json").read_text() == '{"my": "notes"}'


def test_unreadable_media_and_missing_member(tmp_path: Path):
    docs = [
        Document([Part("image", media=0, data=MediaBytes("png", b"not a png"))], key="broken"),
        Document([Part("audio", media=0, data=MediaBytes("flac", b"not a flac"))], key="noise"),
        Document([Part("image", media=0, data=np.zeros((2, 3), np.float32))], key="good"),
    ]
    write_documents(docs, tmp_path / "out")
    with pytest.raises(DocumentError, match=r"sample 'broken' in .*shard-000000\.tar.*unreadable image"):
        next(read_documents(tmp_path / "out"))
    policy = BadSamplePolicy(max_bad_fraction=1.0)
    assert [d.key for d in read_documents(tmp_path / "out", policy=policy)] == ["good"]
    assert policy.skipped == 2 and policy.seen == 2  # good documents are counted by the consumer

    sample = {"__key__": "k", "__url__": "s.tar", "json": json.dumps({"parts": [{"type": "image", "media": 3}]})}
    from unimodal.data.shards import sample_to_document

    with pytest.raises(DocumentError, match="sample 'k' in s.tar: image part refers to media 3 but the sample has no member"):
        sample_to_document(sample)
    sample["3"] = b"written by another tool"
    with pytest.raises(DocumentError, match="sample 'k' in s.tar: member '3' has no file extension, so its image type is unknown"):
        sample_to_document(sample)


def truncate_tar(path: Path) -> None:
    """Cut a tar file in the middle of a member's data (a cut at a header boundary reads as a short tar)."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    middle = members[len(members) // 2]
    path.write_bytes(path.read_bytes()[: middle.offset_data + middle.size // 2])


def test_truncated_tar_is_counted_not_fatal(tmp_path: Path, caplog):
    docs = [Document([Part("image", media=0, data=np.ones((64, 8), np.float32))], key=f"d{i}") for i in range(6)]
    write_documents(docs, tmp_path / "out")
    shard = tmp_path / "out/shard-000000.tar"
    truncate_tar(shard)
    with pytest.raises(ShardError, match="unreadable tar"):
        list(iter_samples([str(shard)]))
    policy = BadSamplePolicy(max_bad_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="unimodal.data"):
        keys = [d.key for d in read_documents([str(shard)], policy=policy)]
    assert keys == ["d0", "d1"]  # the samples before the cut survive
    assert policy.skipped == 1 and policy.kinds["ShardError"] == 1
    assert "unreadable tar" in caplog.text and "shard-000000.tar" in caplog.text and "<_io" not in caplog.text, caplog.text


def test_bad_sample_policy_aborts_above_fraction(caplog):
    policy = BadSamplePolicy(max_bad_fraction=0.1, min_samples=10)
    with caplog.at_level(logging.WARNING, logger="unimodal.data"):
        policy.skip(DocumentError("broken"), "k1", "s.tar")  # 1 of 1, but fewer than min_samples seen
    assert caplog.records[-1].getMessage() == "skipping sample 'k1' in s.tar: broken"
    # met again (a stream looping over its shards): counted, not logged again; a reason that names
    # its sample already is not prefixed twice
    lenient = BadSamplePolicy(max_bad_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="unimodal.data"):
        for _ in range(3):
            lenient.skip(DocumentError("broken"), "k1", "s.tar")
            lenient.skip(DocumentError("sample 'k0' in s.tar, media 0: unreadable image"), "k0", "s.tar")
    assert [r.getMessage() for r in caplog.records[-2:]] == ["skipping sample 'k1' in s.tar: broken",
                                                             "skipping sample 'k0' in s.tar, media 0: unreadable image"]
    assert len(caplog.records) == 3 and lenient.skipped == 6
    for _ in range(9):
        policy.ok()  # 1 of 10: exactly the limit
    with pytest.raises(TooManyBadSamples, match=r"too many bad samples: 2 of 11 skipped.*2 DocumentError; first: k1 in s\.tar: broken; k2"):
        policy.skip(DocumentError("again"), "k2", "s.tar")

    with pytest.raises(TooManyBadSamples, match="1 of 1"):
        BadSamplePolicy(max_bad_fraction=0).skip("bad", "k", "s.tar")


def _cut_on_a_header_boundary(shard: Path, keep_members: int) -> None:
    """Truncate a tar right before the header of member ``keep_members``: it still reads cleanly."""
    import tarfile

    with tarfile.open(shard) as tar:
        offset = tar.getmembers()[keep_members].offset
    shard.write_bytes(shard.read_bytes()[:offset])


def test_a_shard_cut_on_a_header_boundary_is_counted(tmp_path):
    docs = [Document([Part("text", text=f"document {i}")], key=f"doc{i:03d}") for i in range(20)]
    write_documents(docs, tmp_path / "indexed")
    (shard,) = sorted((tmp_path / "indexed").glob("*.tar"))
    _cut_on_a_header_boundary(shard, 12)  # one member (KEY.json) per document
    policy = BadSamplePolicy(max_bad_fraction=1.0)
    read = list(read_documents([str(shard)], policy=policy))
    assert len(read) == 12 and policy.skipped == 8 and "cut short: 12 of the 20" in policy.examples[0].reason

    # without an index, the missing end-of-archive marker gives it away
    write_documents(docs, tmp_path / "bare")
    (bare,) = sorted((tmp_path / "bare").glob("*.tar"))
    (tmp_path / "bare" / "stats.json").unlink()
    _cut_on_a_header_boundary(bare, 12)
    policy = BadSamplePolicy(max_bad_fraction=1.0)
    assert len(list(read_documents([str(bare)], policy=policy))) == 12 and policy.skipped == 1
    with pytest.raises(ShardError, match="end-of-archive"):
        list(read_documents([str(bare)]))
    # a stats.json that is damaged or of another shape indexes nothing: the marker check still applies
    for damaged in ("[]", '{"shards": [{"name": "shard-000000.tar", "documents": "20"}]}', "{cut"):
        (tmp_path / "bare" / "stats.json").write_text(damaged)
        policy = BadSamplePolicy(max_bad_fraction=1.0)
        assert len(list(read_documents([str(bare)], policy=policy))) == 12 and policy.skipped == 1


def test_packing_that_would_write_nothing_is_an_error_and_leaves_nothing(tmp_path: Path):
    empty = _write_source(tmp_path, [""])
    with pytest.raises(EmptyOutput, match=r"no documents to write to .*empty: src\.jsonl holds 0 records"):
        pack_jsonl(empty, tmp_path / "empty", progress=False)
    assert not (tmp_path / "empty").exists()
    bad = _write_source(tmp_path, ["not json"])
    with pytest.raises(EmptyOutput, match=r"holds 1 records, 1 of them bad \(first: src\.jsonl:1: malformed JSON"):
        pack_jsonl(bad, tmp_path / "bad", skip_bad=True, progress=False)
    # three documents and a 5% split: no document falls in val, so train is not kept either
    src = _write_source(tmp_path, [json.dumps({"key": k, "parts": [{"type": "text", "text": k}]}) for k in ("a", "b", "c")])
    with pytest.raises(EmptyOutput, match=r"split/val.*with --val_fraction 0\.05 no document falls in it"):
        pack_jsonl(src, tmp_path / "split", val_fraction=0.05, progress=False)
    assert not (tmp_path / "split" / "train").exists()
    assert pack_jsonl(src, tmp_path / "split", val_fraction=0.9, progress=False)["val"]["documents"] >= 1
    # into folders that were there before: only what this command wrote goes, the user's files stay
    (tmp_path / "mine" / "train").mkdir(parents=True)
    (tmp_path / "mine" / "train" / "notes.txt").write_text("mine")
    with pytest.raises(EmptyOutput, match="no document falls in it"):
        pack_jsonl(src, tmp_path / "mine", val_fraction=0.05, progress=False)
    assert sorted(p.name for p in (tmp_path / "mine").rglob("*")) == ["notes.txt", "train"]
    # Ctrl-C while val is written: no train split is kept, so the same command can run again
    import unimodal.data.jsonl as jsonl

    real = jsonl._pack_jsonl

    def interrupted(src, out_dir, **kwargs):
        if out_dir.name == "val":
            raise KeyboardInterrupt
        return real(src, out_dir, **kwargs)

    jsonl._pack_jsonl = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            pack_jsonl(src, tmp_path / "mine", val_fraction=0.9, progress=False)
    finally:
        jsonl._pack_jsonl = real
    assert sorted(p.name for p in (tmp_path / "mine").rglob("*")) == ["notes.txt", "train"]
    assert pack_jsonl(src, tmp_path / "mine", val_fraction=0.9, progress=False)["val"]["documents"] >= 1


def test_shard_limits_and_out_are_checked_before_packing(tmp_path: Path):
    src = _write_source(tmp_path, [GOOD])
    with pytest.raises(ValueError, match="max_docs_per_shard=0 and a shard size of 1 bytes must both be at least 1"):
        pack_jsonl(src, tmp_path / "out", max_docs_per_shard=0, max_bytes_per_shard=1, progress=False)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileExistsError, match="--out .*file is a file; give a directory for the shards"):
        pack_jsonl(src, tmp_path / "file", progress=False)
    assert (tmp_path / "file").read_text() == "mine" and not (tmp_path / "out").exists()


def test_a_media_file_whose_content_is_not_its_extension_is_refused_when_packed(tmp_path: Path):
    (tmp_path / "notes.png").write_text("not a picture")
    wav = tmp_path / "clip.wav"
    soundfile.write(wav, np.zeros(160, np.float32), 16000)
    (tmp_path / "clip.flac").write_bytes(wav.read_bytes())  # renamed, not converted
    Image.new("RGB", (4, 4)).save(tmp_path / "real.png")
    for name, message in (("notes.png", r"src\.jsonl:1: image file 'notes.png' is not a \.png file \(it starts with b'not a pictur'\)"),
                          ("clip.flac", r"audio file 'clip.flac' is not a \.flac file \(it starts with b'RIFF")):
        kind = "image" if name.endswith("png") else "audio"
        src = _write_source(tmp_path, [json.dumps({"parts": [{"type": kind, "path": name}]})])
        with pytest.raises(DocumentError, match=message):
            pack_jsonl(src, tmp_path / "out", progress=False)
    src = _write_source(tmp_path, [json.dumps({"parts": [{"type": "image", "path": "real.png"}, {"type": "audio", "path": "clip.wav"}]})])
    assert pack_jsonl(src, tmp_path / "out", progress=False)["documents"] == 1


def test_a_set_missing_a_shard_its_stats_list_is_refused(tmp_path: Path):
    """A deleted shard (of a packed set, or of a built-in world) would leave the rest read as the whole set."""
    from unimodal.data.shards import expand_shards

    write_documents([Document([Part("text", text=str(i))], key=f"k{i}") for i in range(4)], tmp_path / "set", max_docs_per_shard=2)
    assert len(expand_shards(tmp_path / "set")) == 2
    (tmp_path / "set" / "shard-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"set: 1 of the 2 shards its stats.json lists are missing \(first: shard-000001.tar\)"):
        inspect_path(tmp_path / "set")
    (tmp_path / "set" / "stats.json").unlink()  # the user's own choice: read what is there
    assert len(expand_shards(tmp_path / "set")) == 1


def test_a_set_whose_writing_was_killed_is_refused_until_its_stats_are_written(tmp_path: Path):
    """`kill -9` during `data pack` left shards without stats.json, which a run read as the whole set."""
    from unimodal.data.shards import expand_shards, save_stats, write_shards

    docs = [Document([Part("text", text=str(i))], key=f"k{i}") for i in range(4)]
    stats = write_shards(docs, tmp_path / "set", max_docs_per_shard=2, max_bytes_per_shard=2**20, prefix="shard")  # the kill: no stats
    with pytest.raises(FileNotFoundError, match=r"set: the command that wrote these shards did not finish \(.writing and no stats.json\)"):
        expand_shards(tmp_path / "set")
    save_stats(tmp_path / "set", stats)
    assert len(expand_shards(tmp_path / "set")) == 2 and not (tmp_path / "set" / ".writing").exists()
    with pytest.raises(DocumentError):  # a write that fails removes its shards, and the marker with them
        write_shards([*docs, docs[0]], tmp_path / "failed", max_docs_per_shard=2, max_bytes_per_shard=2**20, prefix="shard")
    assert list((tmp_path / "failed").iterdir()) == []


def test_a_file_that_is_not_a_shard_is_named_as_such(tmp_path: Path):
    picture = tmp_path / "cat.png"
    Image.new("RGB", (4, 4)).save(picture)
    with pytest.raises(ValueError, match=r"cat\.png is not a tar shard \(a folder of \.tar shards, a shard or a brace pattern\)"):
        inspect_path(picture)


def test_members_named_like_paths_are_bad_samples(tmp_path: Path):
    """A tar not written by data pack may name members ../x or /x: each is counted as bad, never read as a document."""
    import io

    good = json.dumps(Document([Part("text", text="fine")], key="ok").to_json()).encode()
    shard = tmp_path / "odd.tar"
    with tarfile.open(shard, "w") as tar:
        for name in ("ok.json", "../../tmp/escape.json", "/tmp/absolute.json", "sub/dir.json"):
            info = tarfile.TarInfo(name)
            info.size = len(good)
            tar.addfile(info, io.BytesIO(good))
    policy = BadSamplePolicy(max_bad_fraction=1.0)
    assert [doc.key for doc in read_documents(shard, policy=policy)] == ["ok"]
    assert policy.skipped == 3
    with pytest.raises(DocumentError, match=r"odd\.tar: invalid sample key '\.\./\.\./tmp/escape'"):
        list(read_documents(shard))


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar to write a sparse member")
def test_a_member_that_would_expand_without_bound_ends_its_shard_unread(tmp_path: Path):
    """A sparse member reads its holes as zeros (10 KB of tar declared 2 GB, which were read whole),
    and a header may declare any size: neither is read; the shard ends there as one bad sample."""
    import subprocess

    good = json.dumps(Document([Part("text", text="fine")], key="ok").to_json()).encode()
    (tmp_path / "ok.json").write_bytes(good)
    with open(tmp_path / "a.json", "wb") as holes:
        holes.truncate(2**31)
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", "sparse.tar", "ok.json", "a.json"], cwd=tmp_path, check=True)
    assert (tmp_path / "sparse.tar").stat().st_size < 100_000
    declared = tarfile.TarInfo("b.json")
    declared.size = 2**40
    (tmp_path / "declared.tar").write_bytes((tmp_path / "sparse.tar").read_bytes()[:1024] + declared.tobuf(tarfile.GNU_FORMAT))  # ok.json, then b.json
    for shard, what in (("sparse.tar", "'a.json' is a sparse member"), ("declared.tar", "'b.json' is a member of 1048576 MiB")):
        policy = BadSamplePolicy(max_bad_fraction=1.0)
        assert [doc.key for doc in read_documents(tmp_path / shard, policy=policy)] == ["ok"]
        assert policy.skipped == 1
        with pytest.raises(ShardError, match=f"{shard}: {what}, which `unimodal data pack` never writes"):
            list(read_documents(tmp_path / shard))


def test_members_python_would_parse_its_own_way_are_bad_samples(tmp_path: Path):
    """Deep nesting, a 5,000-digit integer and a lone surrogate in KEY.json are each one bad
    sample, not a RecursionError, a ValueError or a tokenizer's crash."""
    import io

    members = {
        "ok.json": json.dumps(Document([Part("text", text="fine")], key="ok").to_json()),
        "deep.json": '{"parts": [{"type": "text", "text": "a"}], "meta": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "big.json": '{"parts": [{"type": "text", "text": "a"}], "meta": {"n": 1' + "0" * 5000 + "}}",
        "lone.json": '{"parts": [{"type": "text", "text": "\\ud800"}]}',
    }
    shard = tmp_path / "odd.tar"
    with tarfile.open(shard, "w") as tar:
        for name, text in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    policy = BadSamplePolicy(max_bad_fraction=1.0)
    assert [doc.key for doc in read_documents(shard, policy=policy)] == ["ok"]
    assert policy.skipped == 3
    report = inspect_path(shard)
    assert "bad samples: 3 (first: sample 'deep'" in report and "\n  ok in odd.tar" in report


def test_a_null_messages_or_parts_field_counts_as_absent(tmp_path: Path):
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "parts": None}
    document = {"messages": None, "parts": [{"type": "text", "text": "x"}]}
    src = _write_source(tmp_path, [json.dumps(chat), json.dumps(document)])
    assert pack_jsonl(src, tmp_path / "out", progress=False)["documents"] == 2
