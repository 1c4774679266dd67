#!/usr/bin/env python
"""Train a small byte-level BPE tokenizer on text files and save it as a `PreTrainedTokenizerFast` directory.

    python tokenization/train_bpe.py --input corpus.txt [--input more.txt] --vocab-size 1024 --output my_tokenizer

The result loads with `AutoTokenizer.from_pretrained("my_tokenizer")` and needs no custom code. Its alphabet is the
256 bytes (GPT-2's byte-to-unicode mapping), so any text encodes and decodes back exactly; `<|endoftext|>` is the
single special token (eos, pad and bos). The vocabulary size counts the 256 bytes, the special token and the merges,
so it must be at least 257 (257 means no merges: a byte-level tokenizer like the built-in EBTTokenizer, but with
other ids). Set the model's `vocab_size` to `len(tokenizer)` and its `eos_token_id`/`pad_token_id` to the ids the
script prints.
"""

from __future__ import annotations

import argparse
import codecs
import sys
from pathlib import Path

ENDOFTEXT = "<|endoftext|>"
NUM_BYTES = 256
MIN_VOCAB_SIZE = NUM_BYTES + 1


class TrainBPEError(ValueError):
    """A problem with the arguments (missing or empty input, too small vocabulary)."""


def check_inputs(inputs: list[str], vocab_size: int) -> list[Path]:
    """Returns the input paths after checking that they are non-empty files and that the vocabulary is large enough."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise TrainBPEError(
            f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 byte tokens + the special token {ENDOFTEXT}), "
            f"got {vocab_size}"
        )
    if not inputs:
        raise TrainBPEError("no --input file given")
    paths = []
    for name in inputs:
        path = Path(name)
        if not path.exists():
            raise TrainBPEError(f"input file not found: {name}")
        if not path.is_file():
            raise TrainBPEError(f"input is not a file: {name}")
        if path.stat().st_size == 0:
            raise TrainBPEError(f"input file is empty: {name}")
        check_utf8(path)
        paths.append(path)
    return paths


def check_utf8(path: Path, chunk_size: int = 1 << 20) -> None:
    """Raises `TrainBPEError` naming the file and byte offset if `path` is not valid UTF-8 (read in chunks)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while True:
            chunk = f.read(chunk_size)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                raise TrainBPEError(
                    f"input file is not valid UTF-8: {path} (near byte {offset + max(error.start, 0)})"
                ) from None
            if not chunk:
                return
            offset += len(chunk)


def train_bpe(inputs: list[str], vocab_size: int, output: str, min_frequency: int = 2, model_max_length=None):
    """Trains the tokenizer, saves it to `output` and returns it (a `PreTrainedTokenizerFast`)."""
    paths = check_inputs(inputs, vocab_size)

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    # No prefix space: decoding gives back exactly the encoded text.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train([str(p) for p in paths], trainer)

    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        bos_token=ENDOFTEXT,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    Path(output).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(output)
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", action="append", required=True, help="text file (UTF-8); repeat for several")
    parser.add_argument("--vocab-size", type=int, required=True, help=f"total vocabulary size (>= {MIN_VOCAB_SIZE})")
    parser.add_argument("--output", required=True, help="directory to save the tokenizer to")
    parser.add_argument("--min-frequency", type=int, default=2, help="minimum count of a pair to be merged")
    parser.add_argument("--model-max-length", type=int, default=None, help="saved as the tokenizer's model_max_length")
    args = parser.parse_args(argv)
    try:
        tokenizer = train_bpe(args.input, args.vocab_size, args.output, args.min_frequency, args.model_max_length)
    except TrainBPEError as error:
        parser.error(str(error))  # prints usage and the message to stderr, exits with status 2
    print(
        f"saved a byte-level BPE tokenizer with {len(tokenizer)} tokens to {args.output} "
        f"(eos/pad/bos {ENDOFTEXT} = id {tokenizer.eos_token_id})"
    )
    if len(tokenizer) < args.vocab_size:
        print(
            f"note: the corpus only allowed {len(tokenizer)} of the {args.vocab_size} requested tokens",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
