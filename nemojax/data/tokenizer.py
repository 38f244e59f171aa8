"""Byte-level tokenizer: ids are the UTF-8 bytes of the text (vocab 256), so any text round-trips and
no vocabulary file is needed. Byte 0 (NUL, absent from ordinary text) separates packed documents."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    vocab_size = 256
    eod_id = 0

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError(f"ByteTokenizer.decode: ids must be in [0, 255]; got range [{ids.min()}, {ids.max()}]")
        return bytes(ids.astype(np.uint8)).decode("utf-8", errors="replace")
