"""Language rules: fastText's top-1 label (basic, text-based, image-based) and CLD3's (LAION-2B).

DataComp asks fastText's ``lid.176`` model for its top-1 label and keeps ``en``, with no
confidence threshold; CLD3 (``gcld3.NNetLanguageIdentifier(min_num_bytes=0,
max_num_bytes=1000)``) is used only by the LAION-2B reproduction. Both see the caption with
every ``\\n`` replaced by a space. The models themselves are loaded by `pipeline.models`; the
functions here prepare their input and label every row (the rules compare the labels).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from filters.text import caption_array


def language_id_input(texts: pa.Array) -> pa.Array:
    """The text a language identifier sees: newlines replaced by spaces, as DataComp does."""
    return pc.replace_substring(caption_array(texts), "\n", " ")


def language_labels(text, top1, text_status=None) -> pa.Array:
    """A language identifier's label for every readable caption (null for the others), with
    `top1` (list of str -> list of str) called once per distinct text; `text_status` as in
    `filters.text.readable_captions`."""
    from filters.text import readable_captions

    texts = language_id_input(readable_captions(caption_array(text), text_status))
    encoded = pc.dictionary_encode(texts)
    labels = pa.array(top1(encoded.dictionary.to_pylist()), type=pa.string())
    return labels.take(encoded.indices)


def fasttext_signals(text, text_status, fasttext) -> dict[str, pa.Array]:
    return {"fasttext_lang": language_labels(text, fasttext, text_status)}


def cld3_signals(text, text_status, cld3) -> dict[str, pa.Array]:
    return {"cld3_lang": language_labels(text, cld3, text_status)}
