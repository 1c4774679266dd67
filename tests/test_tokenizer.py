"""Tests of the byte-level EBTTokenizer and of tokenization/train_bpe.py."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import modeling_ebt  # noqa: F401  (first, so its registrations run)
from modeling_ebt.configuration_ebt import EBTConfig
from modeling_ebt.tokenization_ebt import EBTTokenizer, register_tokenizer

REPO = Path(__file__).resolve().parents[1]
TRAIN_BPE = REPO / "tokenization" / "train_bpe.py"
EOS = "<|endoftext|>"

# Idempotent; harmless if modeling_ebt/__init__.py already registered the tokenizer.
register_tokenizer()

TEXTS = [
    "hello",
    "",
    "héllo wörld — naïve café",
    "emoji 🤗🚀 and a flag 🇫🇷 and ZWJ 👩‍👩‍👧",
    "日本語のテキスト, 中文, 한국어, العربية, עברית",
    "tabs\tnewlines\n\r\n nul\x00 del\x7f bom\ufeff",
    "  leading and trailing spaces  ",
    "math 𝔸 ∑ ∞ and a lone surrogate-free astral char \U0010fffd",
]


@pytest.fixture(scope="module")
def tok() -> EBTTokenizer:
    return EBTTokenizer()


# ----------------------------------------------------------------------------------------------- vocabulary


def test_sizes_and_special_tokens(tok):
    assert len(tok) == 257
    assert len(tok) == EBTConfig().vocab_size
    assert tok.vocab_size == 256
    assert tok.eos_token == tok.pad_token == tok.bos_token == EOS
    assert tok.eos_token_id == tok.pad_token_id == tok.bos_token_id == 256
    assert tok.unk_token is None
    assert tok.all_special_ids == [256]
    assert tok.convert_tokens_to_ids(EOS) == 256
    assert tok.convert_ids_to_tokens(256) == EOS
    vocab = tok.get_vocab()
    assert len(vocab) == 257
    assert sorted(vocab.values()) == list(range(257))
    assert vocab["a"] == 97


def test_bytes_are_ids(tok):
    text = "héllo 🤗"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert ids == [104, 195, 169, 108, 108, 111, 32, 240, 159, 164, 151]
    assert tok.tokenize("é") == ["\xc3", "\xa9"]
    assert tok.convert_tokens_to_ids(["\xc3", "\xa9"]) == [195, 169]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_tokens_to_string(tok.tokenize(text)) == text


def test_all_byte_ids_in_range_and_all_bytes_decode(tok):
    every_byte = bytes(range(256))
    text = every_byte.decode("utf-8", errors="replace")
    ids = tok.encode(text)
    assert min(ids) >= 0 and max(ids) < len(tok)
    # Each byte id decodes on its own: ASCII to itself, the rest (not valid UTF-8 alone) to U+FFFD.
    assert tok.decode(list(range(128))) == every_byte[:128].decode("ascii")
    assert tok.decode([0x80]) == "\ufffd"
    assert tok.decode([0xFF]) == "\ufffd"


def test_invalid_utf8_becomes_replacement_char(tok):
    assert tok.decode([104, 0xFF, 105]) == "h\ufffdi"
    # A truncated 3-byte sequence (the euro sign is E2 82 AC) at the end is one U+FFFD, as in bytes.decode.
    assert tok.decode([104, 0xE2, 0x82]) == "h\ufffd"
    assert tok.decode([0xE2, 0x82, 0xAC]) == "€"
    # A lone continuation byte between valid text.
    assert tok.decode(list(b"a") + [0xA9] + list(b"b")) == "a\ufffdb"
    # The handler can be changed per call or per tokenizer.
    with pytest.raises(UnicodeDecodeError):
        tok.decode([0xFF], errors="strict")
    assert tok.decode([104, 0xFF], errors="ignore") == "h"
    assert EBTTokenizer(errors="ignore").decode([104, 0xFF, 105]) == "hi"


def test_special_tokens_in_text_and_skipping(tok):
    text = f"one{EOS}two"
    ids = tok.encode(text)
    assert ids == list(b"one") + [256] + list(b"two")
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "onetwo"
    # With split_special_tokens the literal text is encoded as bytes.
    assert tok.encode(text, split_special_tokens=True) == list(text.encode("utf-8"))
    # Bytes before a special token are flushed as text; an incomplete sequence before it becomes U+FFFD.
    assert tok.decode([0xC3, 256, 0xC3, 0xA9]) == f"\ufffd{EOS}é"
    assert tok.decode([0xC3, 256, 0xA9], skip_special_tokens=True) == "é"


def test_no_automatic_special_tokens(tok):
    assert tok("hi", add_special_tokens=True)["input_ids"] == [104, 105]
    assert tok("hi", add_special_tokens=False)["input_ids"] == [104, 105]
    assert tok.build_inputs_with_special_tokens([1, 2], [3]) == [1, 2, 3]
    assert tok.num_special_tokens_to_add() == 0
    assert tok("hi", return_special_tokens_mask=True)["special_tokens_mask"] == [0, 0]
    assert tok.get_special_tokens_mask([104, 256], already_has_special_tokens=True) == [0, 1]
    assert "token_type_ids" not in tok("hi")


def test_out_of_range_ids_raise(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([104, 257])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-100])


def test_adding_tokens(tok):
    fresh = EBTTokenizer()
    assert fresh.add_tokens(["<think>"]) == 1
    assert len(fresh) == 258
    ids = fresh.encode("a<think>é")
    assert ids == [97, 257, 195, 169]
    assert fresh.decode(ids) == "a<think>é"
    with pytest.raises(ValueError, match="U\\+0080..U\\+00FF"):
        fresh.add_tokens(["é"])
    assert len(tok) == 257  # the shared fixture is untouched


# ------------------------------------------------------------------------------------------ tensors, batches


def test_return_tensors(tok):
    enc = tok("hello", return_tensors="pt")
    assert isinstance(enc["input_ids"], torch.Tensor)
    assert enc["input_ids"].tolist() == [[104, 101, 108, 108, 111]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1, 1, 1]]
    assert tok.decode(enc["input_ids"][0]) == "hello"
    assert tok.decode(enc["input_ids"]) == ["hello"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding(side):
    tok = EBTTokenizer(padding_side=side)
    enc = tok(["hi", "héllo"], padding=True, return_tensors="pt")
    pad = [256] * 4
    if side == "right":
        assert enc["input_ids"].tolist() == [[104, 105, *pad], [104, 195, 169, 108, 108, 111]]
        assert enc["attention_mask"].tolist() == [[1, 1, 0, 0, 0, 0], [1] * 6]
    else:
        assert enc["input_ids"].tolist() == [[*pad, 104, 105], [104, 195, 169, 108, 108, 111]]
        assert enc["attention_mask"].tolist() == [[0, 0, 0, 0, 1, 1], [1] * 6]
    assert tok.batch_decode(enc["input_ids"], skip_special_tokens=True) == ["hi", "héllo"]
    kept = tok.batch_decode(enc["input_ids"])
    assert kept[0] == (EOS * 4 + "hi" if side == "left" else "hi" + EOS * 4)


def test_padding_side_per_call_and_max_length(tok):
    enc = tok(["a", "abc"], padding="max_length", max_length=5, padding_side="left")
    assert enc["input_ids"] == [[256, 256, 256, 256, 97], [256, 256, 97, 98, 99]]
    assert enc["attention_mask"] == [[0, 0, 0, 0, 1], [0, 0, 1, 1, 1]]
    enc = tok(["abcdef"], truncation=True, max_length=3)
    assert enc["input_ids"] == [[97, 98, 99]]


def test_batch_decode(tok):
    assert tok.batch_decode([[104, 105], [256, 0xF0, 0x9F, 0xA4, 0x97]]) == ["hi", f"{EOS}🤗"]
    assert tok.batch_decode([[104, 105], [256, 104]], skip_special_tokens=True) == ["hi", "h"]
    assert tok.batch_decode([]) == []


# ------------------------------------------------------------------------------------------- save and load


def test_save_and_load(tok, tmp_path):
    saved = tok.save_pretrained(tmp_path)
    assert str(tmp_path / "tokenizer_config.json") in saved
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "EBTTokenizer"
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_ebt.EBTTokenizer"
    assert config["eos_token"] == config["pad_token"] == config["bos_token"] == EOS
    assert config["added_tokens_decoder"]["256"]["content"] == EOS
    assert (tmp_path / "tokenization_ebt.py").is_file()  # the remote code for the Hub

    text = TEXTS[3] + EOS + TEXTS[4]
    for loaded in (EBTTokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert isinstance(loaded, EBTTokenizer)
        assert len(loaded) == 257
        assert loaded.eos_token_id == loaded.pad_token_id == 256
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text


def test_auto_tokenizer_with_model_config(tok, tmp_path):
    EBTConfig().save_pretrained(tmp_path)
    EBTTokenizer(padding_side="left", model_max_length=256).save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is EBTTokenizer
    assert loaded.padding_side == "left"
    assert loaded.model_max_length == 256
    assert loaded("abc")["input_ids"] == [97, 98, 99]


def test_added_tokens_survive_save(tmp_path):
    tok = EBTTokenizer()
    tok.add_tokens(["<think>"])
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == 258
    assert loaded.encode("x<think>") == [120, 257]


def test_module_is_self_contained():
    """Module-level imports are only the standard library and transformers (the file is Hub remote code)."""
    source = (REPO / "modeling_ebt" / "tokenization_ebt.py").read_text()
    tree = ast.parse(source)
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports only inside register_tokenizer"
            top_level.add(node.module.split(".")[0])
    assert top_level <= {"__future__", "transformers"}


def test_remote_code_load_in_fresh_process(tok, tmp_path):
    """What a Hub user gets: the saved copy of tokenization_ebt.py loads with trust_remote_code, without the package."""
    save_dir = tmp_path / "tok"
    tok.save_pretrained(save_dir)
    script = (
        "import sys, json\n"
        "from transformers import AutoTokenizer\n"
        f"t = AutoTokenizer.from_pretrained({str(save_dir)!r}, trust_remote_code=True)\n"
        "assert 'modeling_ebt' not in sys.modules, 'the package was imported'\n"
        "ids = t.encode('h\\u00e9 \\U0001f917')\n"
        "print(json.dumps([type(t).__name__, type(t).__module__, len(t), ids, t.decode(ids + [256, 255])]))\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    name, module, size, ids, text = json.loads(result.stdout.strip().splitlines()[-1])
    assert name == "EBTTokenizer"
    assert module.startswith("transformers_modules")
    assert size == 257
    assert ids == [104, 195, 169, 32, 240, 159, 164, 151]
    assert text == f"hé 🤗{EOS}\ufffd"


def test_text_generation_pipeline(tok):
    from transformers import GPT2Config, GPT2LMHeadModel, pipeline

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok), n_layer=1, n_embd=16, n_head=2, n_positions=64, eos_token_id=256, pad_token_id=256
    )
    generator = pipeline("text-generation", model=GPT2LMHeadModel(config).eval(), tokenizer=EBTTokenizer())
    assert generator.tokenizer.padding_side == "left"  # the pipeline switches decoder-only batching to left padding
    out = generator("hello", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("hello")
    batched = generator(["héllo", "a"], max_new_tokens=3, do_sample=False, batch_size=2)
    assert [o[0]["generated_text"][: len(p)] for o, p in zip(batched, ["héllo", "a"], strict=True)] == ["héllo", "a"]
    full = generator("abc", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    new = generator("abc", max_new_tokens=3, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert full == "abc" + new


# --------------------------------------------------------------------------------------------- train_bpe.py


def _run_train_bpe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAIN_BPE), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def _corpus(path: Path) -> Path:
    lines = [
        "the quick brown fox jumps over the lazy dog",
        "über naïve café — the fox again 🤗",
        "energy based transformers think by descending an energy landscape",
    ]
    path.write_text("\n".join(lines * 40) + "\n", encoding="utf-8")
    return path


def test_train_bpe_round_trip(tmp_path):
    first = _corpus(tmp_path / "a.txt")
    second = tmp_path / "b.txt"
    second.write_text("a second file with other words, numbers 12345 and 日本語\n" * 20, encoding="utf-8")
    out = tmp_path / "bpe"
    result = _run_train_bpe(
        "--input", str(first), "--input", str(second), "--vocab-size", "300", "--output", str(out), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "300 tokens" in result.stdout
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()

    bpe = AutoTokenizer.from_pretrained(out)
    assert bpe.is_fast
    assert len(bpe) == 300
    assert bpe.eos_token == bpe.pad_token == EOS
    assert bpe.eos_token_id == bpe.pad_token_id == bpe.convert_tokens_to_ids(EOS)
    assert f"id {bpe.eos_token_id}" in result.stdout

    common = "the quick brown fox"
    assert len(bpe.encode(common)) < len(common.encode("utf-8"))  # merges were learned
    for text in [*TEXTS, "unseen: Ωμέγα ₿ 🧪\n", f"two docs{EOS}joined"]:
        ids = bpe.encode(text)
        assert all(0 <= i < len(bpe) for i in ids)
        assert bpe.decode(ids) == text
    ids = bpe.encode(f"x{EOS}y")
    assert bpe.eos_token_id in ids
    assert bpe.decode(ids, skip_special_tokens=True) == "xy"
    enc = bpe(["the", "the quick brown fox"], padding=True, padding_side="left")
    assert enc["input_ids"][0][0] == bpe.pad_token_id
    assert enc["attention_mask"][0][-1] == 1 and enc["attention_mask"][0][0] == 0


def test_train_bpe_minimum_vocab_is_bytes_plus_special(tmp_path):
    out = tmp_path / "bytes"
    result = _run_train_bpe(
        "--input", str(_corpus(tmp_path / "a.txt")), "--vocab-size", "257", "--output", str(out), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    bpe = AutoTokenizer.from_pretrained(out)
    assert len(bpe) == 257
    assert len(bpe.encode("héllo")) == len("héllo".encode())  # no merges: one token per byte
    assert bpe.decode(bpe.encode("héllo 🤗")) == "héllo 🤗"


def test_train_bpe_missing_file(tmp_path):
    result = _run_train_bpe(
        "--input", str(tmp_path / "nope.txt"), "--vocab-size", "300", "--output", str(tmp_path / "out"), cwd=tmp_path
    )
    assert result.returncode == 2
    assert "input file not found" in result.stderr and "nope.txt" in result.stderr
    assert not (tmp_path / "out").exists()


def test_train_bpe_empty_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = _run_train_bpe(
        "--input",
        str(_corpus(tmp_path / "a.txt")),
        "--input",
        str(empty),
        "--vocab-size",
        "300",
        "--output",
        str(tmp_path / "out"),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "input file is empty" in result.stderr and "empty.txt" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", ["256", "0", "-5"])
def test_train_bpe_too_small_vocab(tmp_path, size):
    result = _run_train_bpe(
        "--input",
        str(_corpus(tmp_path / "a.txt")),
        "--vocab-size",
        size,
        "--output",
        str(tmp_path / "out"),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "--vocab-size must be at least 257" in result.stderr
    assert f"got {size}" in result.stderr


def test_train_bpe_invalid_utf8(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"valid start \xff\xfe then garbage")
    result = _run_train_bpe("--input", str(bad), "--vocab-size", "300", "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2
    assert "not valid UTF-8" in result.stderr and "bad.bin" in result.stderr


def test_train_bpe_missing_arguments(tmp_path):
    result = _run_train_bpe("--vocab-size", "300", "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2
    assert "--input" in result.stderr
