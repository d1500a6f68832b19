"""Caption text as the rules see it: readable or not, and its three different lengths.

DataComp measures a caption three ways, and the differences matter (reference section 2):

- `whitespace_word_count`: ``len(text.split())``, Python's split on Unicode whitespace
  (the basic filter: more than 2 words);
- `fasttext_token_count`: ``len(fasttext.tokenize(text))``, fastText's tokenizer, which splits
  on ASCII whitespace and NUL only and adds a ``</s>`` token for every newline (the
  image-based caption pre-filter: more than 1 token);
- `char_count`: ``len(text)`` in code points (both: more than 5 characters).

Every function takes an Arrow string array (or anything `caption_array` accepts) and returns a
NumPy array with one value per row, computed by Arrow kernels over the whole column. A null
caption, or one whose bytes are not valid UTF-8, counts as 0 words, 0 tokens and 0 characters
(DataComp would crash on it; here it simply fails every caption rule).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filters.arrays import to_numpy

# fastText's Dictionary::readWord separators: space, \n, \r, \t, \v, \f and NUL.
_FASTTEXT_TOKEN = "[^ \\n\\r\\t\\v\\f\\x00]+"
# The characters Python's str.split() splits on (str.isspace(): category Zs or bidi class WS, B
# or S); tests/filters/test_text.py checks this list against every code point.
PYTHON_WHITESPACE = (0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x1F, 0x20, 0x85, 0xA0, 0x1680,
                     *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000)
_PYTHON_SPACE_CLASS = "".join(f"\\x{{{c:x}}}" for c in PYTHON_WHITESPACE)
_PYTHON_WORD = f"[^{_PYTHON_SPACE_CLASS}]+"
PYTHON_SPACE_RUN = f"[{_PYTHON_SPACE_CLASS}]+"


class TextStatus(IntEnum):
    """Why a caption can or cannot be read."""

    OK = 0
    NULL = 1  # the parquet holds no caption for the row
    NOT_UTF8 = 2  # the bytes are not valid UTF-8


def caption_array(texts: pa.Array | pa.ChunkedArray | Sequence[str | None]) -> pa.Array:
    """One contiguous Arrow string array from a column, a chunked column or a list."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks() if texts.num_chunks != 1 else texts.chunk(0)
    if not isinstance(texts, pa.Array):
        texts = pa.array(list(texts), type=pa.string())
    if pa.types.is_null(texts.type):
        texts = texts.cast(pa.string())
    if pa.types.is_large_string(texts.type):
        texts = texts.cast(pa.string())
    if not pa.types.is_string(texts.type):
        raise TypeError(f"captions must be strings, got {texts.type}")
    return texts


def text_status(texts: pa.Array) -> np.ndarray:
    """`TextStatus` of every row (uint8): readable, null, or not valid UTF-8."""
    texts = caption_array(texts)
    status = np.where(to_numpy(texts.is_null()), TextStatus.NULL,
                      TextStatus.OK).astype(np.uint8)
    try:
        texts.validate(full=True)
    except pa.ArrowInvalid:
        # Rare: only then look at rows one by one to find which bytes are bad.
        raw = texts.cast(pa.binary())
        for row, value in enumerate(raw.to_pylist()):
            if value is None:
                continue
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                status[row] = TextStatus.NOT_UTF8
    return status


def readable_captions(texts: pa.Array, status: np.ndarray | pa.Array | None = None) -> pa.Array:
    """The captions with unreadable (non-UTF-8) rows turned into nulls, so kernels can run;
    `status` is the rows' `text_status` when known (it saves validating the bytes again)."""
    texts = caption_array(texts)
    if status is None:
        status = text_status(texts)
    elif isinstance(status, (pa.Array, pa.ChunkedArray)):
        status = to_numpy(status)
    bad = status == TextStatus.NOT_UTF8
    if not bad.any():
        return texts
    return pc.if_else(pa.array(bad), pa.nulls(len(texts), pa.string()), texts.cast(pa.binary())
                      ).cast(pa.string(), safe=False)


def whitespace_word_count(texts: pa.Array) -> np.ndarray:
    """``len(text.split())`` per row: words separated by Unicode whitespace, as Python splits."""
    words = pc.count_substring_regex(caption_array(texts), _PYTHON_WORD)
    return to_numpy(pc.fill_null(words, 0)).astype(np.int32)


def fasttext_token_count(texts: pa.Array) -> np.ndarray:
    """``len(fasttext.tokenize(text))`` per row.

    fastText reads words separated by space, ``\\n``, ``\\r``, ``\\t``, ``\\v``, ``\\f`` and NUL,
    and emits an end-of-sentence token ``</s>`` for every newline, so ``"a\\nb"`` has 3 tokens
    and ``"a\\u00a0b"`` (no-break space) has 1.
    """
    texts = caption_array(texts)
    words = pc.fill_null(pc.count_substring_regex(texts, _FASTTEXT_TOKEN), 0)
    newlines = pc.fill_null(pc.count_substring(texts, "\n"), 0)
    return to_numpy(words).astype(np.int32) + to_numpy(newlines).astype(np.int32)


def char_count(texts: pa.Array) -> np.ndarray:
    """``len(text)`` per row: Unicode code points."""
    return to_numpy(pc.fill_null(pc.utf8_length(caption_array(texts)), 0)).astype(np.int32)


def map_distinct(texts: pa.Array, fns: Mapping[str, Callable[[pa.Array], np.ndarray]]) -> dict[str, np.ndarray]:
    """Each of `fns` (Arrow strings -> NumPy values) on every distinct text once, mapped back to
    the rows; null rows get 0 (False)."""
    encoded = pc.dictionary_encode(caption_array(texts))
    index = encoded.indices.to_numpy(zero_copy_only=False)
    valid = ~to_numpy(encoded.indices.is_null()) if encoded.indices.null_count else None
    out = {}
    for name, fn in fns.items():
        values = np.asarray(fn(encoded.dictionary))
        if valid is None:
            out[name] = values[index.astype(np.int64)]
        else:
            out[name] = np.zeros(len(texts), dtype=values.dtype)
            out[name][valid] = values[index[valid].astype(np.int64)]
    return out


def caption_signals(text) -> dict[str, np.ndarray]:
    """The text signal group: readability and the three caption lengths of every row."""
    raw = caption_array(text)
    status = text_status(raw)
    counts = map_distinct(readable_captions(raw, status), {"caption_words": whitespace_word_count,
                                                           "caption_chars": char_count,
                                                           "fasttext_tokens": fasttext_token_count})
    return {"text_status": status, **counts}
