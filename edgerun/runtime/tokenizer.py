"""The bundle's tokenizer.json through the `tokenizers` library (no transformers at run time)."""
from __future__ import annotations

from pathlib import Path

from ..errors import BundleError


class Tokenizer:
    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exceptions for bad files
            raise BundleError(f"{path} is not a valid tokenizer.json: {exc}") from exc
        self._tok.no_truncation()
        self._tok.no_padding()

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)
