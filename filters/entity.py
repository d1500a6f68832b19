"""The text-based filter's entity rule: does any caption word name an ImageNet-21k class?

DataComp (reference section 2), for each ``word in text.split()`` (case and punctuation
unchanged): ``syns = wordnet.synsets(word)`` over all parts of speech; skip the word if there
are none; otherwise the row is a hit if ``syns[0].offset()`` is in the ImageNet-21k id list,
whatever the synset's part of speech.

``synsets`` lower-cases the word, then for each part of speech in NLTK's order (noun, verb,
adjective, adverb) asks ``morphy`` for the base forms WordNet knows and lists their synsets in
index order; ``syns[0]`` is therefore the first synset of the first base form of the first
part of speech that has any. `first_synset_offset` computes exactly that from WordNet's
tables, without building synset objects.

One quirk is version-dependent: DataComp ran NLTK 3.8.1, whose ``morphy`` keeps applying the
suffix rules until a known form appears; later NLTK releases (the one pinned here included)
apply them once. ``TextEntity(morphy_repeat_rules=True)`` (the default) reproduces 3.8.1.

Loading WordNet is `pipeline.models`' job; everything here takes the tables as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filters.arrays import to_numpy
from filters.text import PYTHON_SPACE_RUN, caption_array

# NLTK's POS_LIST: the order in which `wordnet.synsets(word)` lists parts of speech.
POS_ORDER = ("n", "v", "a", "r")


@dataclass(frozen=True, kw_only=True)
class TextEntity:
    """Parameters of the entity rule."""

    morphy_repeat_rules: bool = True  # NLTK 3.8.1's morphy (DataComp's); False: NLTK >= 3.9


@dataclass(frozen=True)
class WordNetTables:
    """What the entity rule needs from WordNet, as plain data.

    Attributes:
        first_offset: lemma -> part of speech -> offset of the lemma's first synset for that
            part of speech (WordNet lists senses most frequent first).
        exceptions: part of speech -> irregular form -> base forms (WordNet's ``*.exc`` files).
        substitutions: part of speech -> (suffix, replacement) rules, in NLTK's order.
    """

    first_offset: Mapping[str, Mapping[str, int]]
    exceptions: Mapping[str, Mapping[str, Sequence[str]]]
    substitutions: Mapping[str, Sequence[tuple[str, str]]]


def morphy(form: str, pos: str, tables: WordNetTables, *, repeat_rules: bool = True) -> list[str]:
    """Base forms of `form` that WordNet has for `pos`, in NLTK's order (``_morphy``)."""
    index = tables.first_offset
    substitutions = tables.substitutions.get(pos, ())
    exceptions = tables.exceptions.get(pos, {})

    def apply_rules(forms: list[str]) -> list[str]:
        out = [f[:-len(old)] + new for f in forms for old, new in substitutions if f.endswith(old)]
        # Dropping repeats keeps every form's first position, so the result order is unchanged,
        # and it stops the repeated rounds from growing geometrically on words like "eseses".
        return list(dict.fromkeys(out))

    def known(forms: Iterable[str]) -> list[str]:
        result: list[str] = []
        for f in forms:
            entry = index.get(f)
            if entry is not None and pos in entry and f not in result:
                result.append(f)
        return result

    if form in exceptions:
        return known([form, *exceptions[form]])
    forms = apply_rules([form])
    found = known([form, *forms])
    if found or not repeat_rules:
        return found
    while forms:  # NLTK 3.8.1: keep applying the rules until a known form appears
        forms = apply_rules(forms)
        found = known(forms)
        if found:
            return found
    return []


def first_synset_offset(word: str, tables: WordNetTables, *, repeat_rules: bool = True) -> int:
    """``wordnet.synsets(word)[0].offset()``, or -1 when WordNet has no synset for the word."""
    lemma = word.lower()
    for pos in POS_ORDER:
        for form in morphy(lemma, pos, tables, repeat_rules=repeat_rules):
            offset = tables.first_offset[form].get(pos)
            if offset is not None:
                return offset
    return -1


@dataclass
class EntityLookup:
    """Word -> "names an ImageNet-21k class?", memoised (captions repeat words a lot)."""

    tables: WordNetTables
    entity_offsets: frozenset[int]
    params: TextEntity = TextEntity()
    _cache: dict[str, bool] = field(default_factory=dict, repr=False)

    def __call__(self, words: Sequence[str]) -> np.ndarray:
        cache = self._cache
        out = np.empty(len(words), dtype=bool)
        for i, word in enumerate(words):
            hit = cache.get(word)
            if hit is None:
                hit = first_synset_offset(word, self.tables,
                                          repeat_rules=self.params.morphy_repeat_rules) in self.entity_offsets
                cache[word] = hit
            out[i] = hit
        return out


def caption_words(texts: pa.Array) -> pa.ListArray:
    """The words of ``text.split()`` of every caption, as an Arrow list array.

    Splitting at runs of Python's whitespace leaves an empty string at a leading or trailing
    run; WordNet has no synset for "", so it never counts as a hit.
    """
    return pc.split_pattern_regex(caption_array(texts), PYTHON_SPACE_RUN)


def entity_hit_mask(texts: pa.Array, word_is_entity: Callable[[Sequence[str]], np.ndarray]) -> np.ndarray:
    """True where any whitespace word of the caption is an entity.

    `word_is_entity` is asked about each distinct word once, as a list of strings.
    """
    words = caption_words(pc.fill_null(caption_array(texts), ""))
    flat = words.flatten()
    if len(flat) == 0:
        return np.zeros(len(texts), dtype=bool)
    encoded = pc.dictionary_encode(flat)
    hits = np.asarray(word_is_entity(encoded.dictionary.to_pylist()), dtype=bool)
    per_word = hits[to_numpy(encoded.indices)]
    offsets = to_numpy(words.offsets).astype(np.int64)
    offsets = offsets - offsets[0]
    cumulative = np.concatenate(([0], np.cumsum(per_word, dtype=np.int64)))
    return (cumulative[offsets[1:]] - cumulative[offsets[:-1]]) > 0


def entity_signals(text, text_status, wordnet) -> dict[str, np.ndarray]:
    """The entity signal group (`wordnet`: words -> is an ImageNet-21k class, e.g. `EntityLookup`);
    unreadable captions are no hit."""
    from filters.text import map_distinct, readable_captions

    texts = readable_captions(caption_array(text), text_status)
    hits = map_distinct(texts, {"imagenet21k_entity": lambda u: entity_hit_mask(u, wordnet)})
    return {name: values.astype(bool) for name, values in hits.items()}
