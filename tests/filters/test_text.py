"""Caption lengths as DataComp measures them: str.split(), fastText's tokenizer, len()."""

import sys

import numpy as np
import pyarrow as pa
import pytest

from datacomp_reference import fasttext_tokenize
from filters.text import (TextStatus, char_count, fasttext_token_count, readable_captions, text_status,
                          whitespace_word_count)

TRICKY = [
    "a red star printed on a shirt", "", " ", "   ", "\n", "a\n", "\na", "one two\nthree",
    "red\u00a0star\u00a0art", "x\u3000y z", "tab\tsep\vvt\fff\rcr", "nul\x00byte here",
    "file\x1csep\x1dgroup", "emoji 😍😍 ok", "ünïcödé wörds", "\u2028line\u2029para", "a  b   c",
    "trailing   ", "   leading", "中文 字符", "word", "\r\n", "a\n\nb",
]


def test_word_count_is_str_split():
    assert whitespace_word_count(pa.array(TRICKY)).tolist() == [len(t.split()) for t in TRICKY]


def test_word_count_on_every_unicode_whitespace_and_more():
    chars = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]
    texts = ["a" + c + "b" for c in chars]
    got = whitespace_word_count(pa.array(texts))
    want = np.array([len(t.split()) for t in texts])
    assert (got == want).all(), [hex(ord(chars[i])) for i in np.flatnonzero(got != want)[:10]]


def test_token_count_is_fasttext_tokenize():
    assert fasttext_token_count(pa.array(TRICKY)).tolist() == [len(fasttext_tokenize(t)) for t in TRICKY]
    # the documented examples
    assert fasttext_tokenize("hello\nworld") == ["hello", "</s>", "world"]
    assert fasttext_tokenize("a\u00a0b") == ["a\u00a0b"]


def test_char_count_is_len():
    assert char_count(pa.array(TRICKY)).tolist() == [len(t) for t in TRICKY]


def test_nulls_count_as_empty():
    texts = pa.array([None, "a b c d e f", None], pa.string())
    assert whitespace_word_count(texts).tolist() == [0, 6, 0]
    assert fasttext_token_count(texts).tolist() == [0, 6, 0]
    assert char_count(texts).tolist() == [0, 11, 0]


def test_status_flags_null_and_invalid_utf8():
    data = b"hello" + b"\xff\xfeabc" + b"ok"
    offsets = pa.array([0, 5, 10, 12, 12], pa.int32()).buffers()[1]
    validity = pa.array([True, True, True, False]).buffers()[1]
    arr = pa.Array.from_buffers(pa.string(), 4, [validity, offsets, pa.py_buffer(data)], null_count=1)
    assert text_status(arr).tolist() == [TextStatus.OK, TextStatus.NOT_UTF8, TextStatus.OK, TextStatus.NULL]
    readable = readable_captions(arr)
    readable.validate(full=True)
    assert readable.to_pylist() == ["hello", None, "ok", None]


@pytest.mark.parametrize("text", ["a\n", "ab\ncdef", "x y"])
def test_prefilter_and_basic_count_words_differently(text):
    # "a\n" is 2 fastText tokens (a, </s>) but 1 whitespace word: DataComp's quirk.
    assert fasttext_token_count(pa.array([text]))[0] == len(fasttext_tokenize(text))
    assert whitespace_word_count(pa.array([text]))[0] == len(text.split())


def test_whitespace_list_is_pythons():
    from filters.text import PYTHON_WHITESPACE

    assert list(PYTHON_WHITESPACE) == [c for c in range(sys.maxunicode + 1) if chr(c).isspace()]
