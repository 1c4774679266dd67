"""Byte-level tokenizer of the Energy-Based Transformers.

Ids 0..255 are the raw bytes of the UTF-8 encoding of the text and id 256 is the special token ``<|endoftext|>``,
which serves as end-of-sequence, padding and beginning-of-sequence token (257 ids, EBTConfig's default
``vocab_size``). The tokenizer has no vocabulary file: everything it needs is in this module, so it works offline
and ``save_pretrained`` only writes ``tokenizer_config.json`` (plus ``added_tokens.json`` and, because the class is
registered for ``AutoTokenizer``, a copy of this file so the Hub can load it as remote code).

This file is uploaded to the Hub as remote code: at module level it imports only the standard library and
``transformers``.
"""

from __future__ import annotations

from transformers import AddedToken, PreTrainedTokenizer

ENDOFTEXT = "<|endoftext|>"
NUM_BYTES = 256


class EBTTokenizer(PreTrainedTokenizer):
    """Byte-level tokenizer: one token per UTF-8 byte, plus ``<|endoftext|>`` (id 256) as eos, pad and bos.

    A byte token is the one-character string ``chr(byte)``; e.g. ``"é"`` (UTF-8 ``C3 A9``) tokenizes to
    ``["Ã", "©"]`` and ids ``[195, 169]``. Decoding joins the bytes again and decodes them with
    ``errors=self.errors`` (``"replace"`` by default), so an invalid or truncated UTF-8 sequence — which a sampled
    byte model can produce — becomes U+FFFD instead of raising. Any string round-trips exactly
    (``decode(encode(s)) == s``); a literal ``"<|endoftext|>"`` in the text becomes the special id 256 unless
    ``split_special_tokens=True`` is passed.

    No special token is added automatically (``add_special_tokens=True`` is accepted and changes nothing):
    documents are delimited with ``eos_token_id`` by the data pipeline, and prompts for generation carry no prefix.
    Append ``tokenizer.eos_token_id`` yourself where a sequence should end.

    Args:
        eos_token, pad_token, bos_token: the special tokens (all ``"<|endoftext|>"`` by default, id 256).
        errors: how ``decode`` treats invalid UTF-8 (any ``bytes.decode`` error handler; default ``"replace"``).
            ``decode(ids, errors="strict")`` overrides it for one call.
    """

    vocab_files_names: dict[str, str] = {}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        eos_token: str | AddedToken = ENDOFTEXT,
        pad_token: str | AddedToken = ENDOFTEXT,
        bos_token: str | AddedToken = ENDOFTEXT,
        errors: str = "replace",
        **kwargs,
    ):
        self.errors = errors
        # Pin the special tokens right after the bytes (id 256) before the base class assigns ids; a saved tokenizer
        # passes its `added_tokens_decoder`, which the base class merges over this.
        specials = []
        for token in (eos_token, pad_token, bos_token):
            content = str(token) if token is not None else None
            if content is not None and content not in specials:
                specials.append(content)
        self._added_tokens_decoder = {}
        for offset, content in enumerate(specials):
            self._check_not_a_byte(content)
            self._added_tokens_decoder[NUM_BYTES + offset] = AddedToken(
                content, lstrip=False, rstrip=False, normalized=False, special=True
            )
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(
            eos_token=eos_token,
            pad_token=pad_token,
            bos_token=bos_token,
            errors=errors,
            **kwargs,
        )

    # ----------------------------------------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of byte ids (256); ``len(tokenizer)`` also counts the special and added tokens (257 by default)."""
        return NUM_BYTES

    def get_vocab(self) -> dict[str, int]:
        vocab = {chr(i): i for i in range(NUM_BYTES)}
        vocab.update(self._added_tokens_encoder)
        return vocab

    @staticmethod
    def _check_not_a_byte(content: str) -> None:
        # A single character below U+0100 is already the token of that byte; as an added token it would be looked up
        # as the byte (for U+0080..U+00FF: not the character's UTF-8), so refuse it rather than mis-encode.
        if len(content) == 1 and 0x80 <= ord(content) < NUM_BYTES:
            raise ValueError(
                f"EBTTokenizer cannot add the token {content!r}: single characters U+0080..U+00FF are the names of "
                "byte tokens; the text is encoded as its UTF-8 bytes anyway."
            )

    def _add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        for token in new_tokens or []:
            self._check_not_a_byte(str(token))
        return super()._add_tokens(new_tokens, special_tokens=special_tokens)

    # ------------------------------------------------------------------------------------------------- encoding

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int | None:
        if len(token) == 1 and ord(token) < NUM_BYTES:
            return ord(token)
        return self.unk_token_id  # None: there is no unknown token, every text is made of bytes

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """No special tokens are added (see the class docstring); a pair is simply concatenated."""
        if token_ids_1 is None:
            return list(token_ids_0)
        return list(token_ids_0) + list(token_ids_1)

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        return [0] * (len(token_ids_0) + (len(token_ids_1) if token_ids_1 else 0))

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        return [0] * (len(token_ids_0) + (len(token_ids_1) if token_ids_1 else 0))

    # ------------------------------------------------------------------------------------------------- decoding

    def _convert_id_to_token(self, index: int) -> str:
        if 0 <= index < NUM_BYTES:
            return chr(index)
        raise ValueError(f"Token id {index} is outside the vocabulary of EBTTokenizer (0..{len(self) - 1}).")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Joins tokens: byte tokens (one character below U+0100) are collected as bytes, added tokens as text."""
        pieces: list[str] = []
        pending = bytearray()
        for token in tokens:
            if token not in self._added_tokens_encoder and len(token) == 1 and ord(token) < NUM_BYTES:
                pending.append(ord(token))
                continue
            if pending:
                pieces.append(pending.decode("utf-8", errors=self.errors))
                pending = bytearray()
            pieces.append(token)
        if pending:
            pieces.append(pending.decode("utf-8", errors=self.errors))
        return "".join(pieces)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs,
    ) -> str:
        errors = kwargs.pop("errors", None) or self.errors
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        pieces: list[str] = []
        pending = bytearray()
        for index in token_ids:
            index = int(index)
            if index in skip:
                continue
            if index in self._added_tokens_decoder:
                if pending:
                    pieces.append(pending.decode("utf-8", errors=errors))
                    pending = bytearray()
                pieces.append(self._added_tokens_decoder[index].content)
            elif 0 <= index < NUM_BYTES:
                pending.append(index)
            else:
                raise ValueError(f"Token id {index} is outside the vocabulary of EBTTokenizer (0..{len(self) - 1}).")
        if pending:
            pieces.append(pending.decode("utf-8", errors=errors))
        text = "".join(pieces)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    # --------------------------------------------------------------------------------------------------- saving

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """The byte vocabulary is built in; there is nothing to write besides ``tokenizer_config.json``."""
        return ()


EBTTokenizer.register_for_auto_class("AutoTokenizer")


def register_tokenizer() -> None:
    """Makes ``AutoTokenizer`` resolve ``EBTConfig`` (and ``tokenizer_class: "EBTTokenizer"``) to this class.

    Safe to call more than once.
    """
    from transformers import AutoTokenizer

    from .configuration_ebt import EBTConfig

    AutoTokenizer.register(EBTConfig, tokenizer_class=EBTTokenizer, exist_ok=True)
