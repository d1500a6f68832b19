"""fastText and CLD3 labels: batched over distinct captions, equal to one predict per caption."""

import numpy as np
import pyarrow as pa
import pytest

from datacomp_reference import Models
from filters.language import language_id_input
from pipeline.models import Cld3LanguageID, FastTextLanguageID, resolve_lid_model

CAPTIONS = ["a red star printed on a shirt", "un cœur rouge sur fond blanc", "Buy now\n\nFree shipping!",
            "", "😍😍😍", "IMG_2041.jpg", "送料無料でお届けします。", "a photo of a dog on the beach",
            "x" * 3000, "two\nlines here"]


@pytest.fixture(scope="module")
def reference():
    return Models()


def test_fasttext_batched_equals_single_predicts(reference):
    lid = FastTextLanguageID(resolve_lid_model(None))
    got = lid.top1(language_id_input(pa.array(CAPTIONS)).to_pylist())
    assert got == [reference.fasttext_language(c) for c in CAPTIONS]
    assert got[0] == "en"


def test_fasttext_list_of_two_is_not_misread():
    # fasttext's predict(list) wrapper unpacks (labels, probs); with fasttext-predict a 2-list broke it.
    lid = FastTextLanguageID(resolve_lid_model(None))
    assert lid.top1(["a photo of a cat on a sofa", "ein Foto von einer Katze"]) == ["en", "de"]


def test_cld3_equals_reference(reference):
    cld3 = Cld3LanguageID()
    assert cld3.top1(language_id_input(pa.array(CAPTIONS)).to_pylist()) == [reference.gcld3_language(c) for c in CAPTIONS]
    # CLD3's real (and kept) behaviour on short English captions
    assert cld3.top1(["a photo of a dog on the beach"]) == ["ga"]


def test_newlines_become_spaces():
    assert language_id_input(pa.array(["a\nb\n", None])).to_pylist() == ["a b ", None]
