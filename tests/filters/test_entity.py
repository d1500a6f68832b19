"""The text-based rule's WordNet lookup equals `wordnet.synsets(word)[0].offset()`."""

import numpy as np
import pyarrow as pa
import pytest

from datacomp_reference import Models, morphy_nltk_381
from filters.entity import EntityLookup, TextEntity, entity_hit_mask, first_synset_offset
from pipeline.models import imagenet21k_offsets, load_wordnet_tables

WORDS = ["tench", "Tench", "dogs", "Dogs", "dog", "shirt", "shirts", "shirts.", "wolves", "mice", "oxen",
         "glasses", "running", "ran", "better", "best", "happily", "wall", "IMG_2041.jpg", "", "a", "the",
         "red", "star", "heart", "moon", "ice_cream", "New_York", "flies", "ponies", "boxes", "churches",
         "women", "leaves", "dogss", "shirtss", "balloonss", "eseseses", "s", "ss", "😍", "ünïcode", "photo"]


@pytest.fixture(scope="module")
def models():
    return Models()


@pytest.fixture(scope="module")
def tables():
    return load_wordnet_tables()


def _reference_offset(wn, word, *, nltk_381):
    original = wn._morphy
    if nltk_381:
        wn._morphy = lambda form, pos, check_exceptions=True: morphy_nltk_381(wn, form, pos, check_exceptions)
    try:
        syns = wn.synsets(word)
        return syns[0].offset() if syns else -1
    finally:
        wn._morphy = original


@pytest.mark.parametrize("nltk_381", [True, False])
def test_first_offset_equals_nltk(models, tables, nltk_381):
    for word in WORDS:
        want = _reference_offset(models.wordnet, word, nltk_381=nltk_381)
        assert first_synset_offset(word, tables, repeat_rules=nltk_381) == want, word


def test_nltk_381_quirk_changes_hits(tables):
    # NLTK 3.8.1 (DataComp) strips "s" twice from "dogss"; later NLTK gives up after one round.
    ids = imagenet21k_offsets()
    assert first_synset_offset("dogss", tables, repeat_rules=True) in ids
    assert first_synset_offset("dogss", tables, repeat_rules=False) == -1


def test_punctuation_and_case(tables):
    ids = imagenet21k_offsets()
    assert first_synset_offset("Tench", tables) == 1440764 in ids  # synsets() lower-cases
    assert first_synset_offset("shirt.", tables) == -1  # punctuation is not stripped


def test_hit_mask_equals_rowwise(models, tables):
    captions = ["a red star printed on a shirt", "my new red star shirt.", "Tench fish", "", None,
                "red\u00a0star\u00a0shirt", "  leading and trailing  ", "no entity here", "my dogss",
                "two\nlines shirt"]
    lookup = EntityLookup(tables=tables, entity_offsets=imagenet21k_offsets(), params=TextEntity())
    got = entity_hit_mask(pa.array(captions, pa.string()), lookup)
    want = [models.contains_entity(c) if c is not None else False for c in captions]
    assert got.tolist() == want
    assert want[0] and not want[1] and want[8]


def test_lookup_asks_each_word_once(tables):
    asked = []

    def spy(words):
        asked.extend(words)
        return np.array([w == "shirt" for w in words])

    got = entity_hit_mask(pa.array(["shirt shirt", "a shirt", "a b", "b"]), spy)
    assert got.tolist() == [True, True, False, False]
    assert sorted(asked) == ["a", "b", "shirt"]
