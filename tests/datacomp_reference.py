"""A straightforward re-statement of DataComp's baselines, row by row, for the tests to compare with.

Written from the rules in ../shared/reference/DATACOMP.md section 2 (as DataComp's
``baselines/apply_filter.py`` runs them): pandas, one ``apply`` per rule, the models called on
one caption at a time, ``wordnet.synsets(word)[0].offset()`` per word, a full sort for the
fraction threshold, a float64 argmax per row for the centroids. No dedup, no vectorised
shortcuts: slow, and obviously right.

Two deliberate departures, because DataComp crashes on such rows: a null caption fails every
caption rule, and NaN scores fail (as in DataComp, where ``NaN >= t`` is False). And one
because CommonPool never has such rows: an all-zero ``l14_img`` (a row without an image, as
``pipeline.score`` writes it) is nearest to no centroid, so the image-based rule never keeps
it (DataComp's argmax would put it on centroid 0).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import pandas as pd

UID_DTYPE = np.dtype("u8,u8")


def _uid_records(uids) -> np.ndarray:
    return np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], UID_DTYPE)


def _sorted(records) -> np.ndarray:
    records = np.concatenate(records) if len(records) else np.empty(0, UID_DTYPE)
    records.sort()
    return records


def parquet_paths(pool: Path) -> list[str]:
    return sorted(glob.glob(os.path.join(pool, "metadata", "*.parquet")))


# --- models, called one caption at a time -----------------------------------------------------
class Models:
    def __init__(self, lid_model: str | None = None):
        import fasttext
        import gcld3

        from pipeline.assets import ensure_nltk_wordnet, fasttext_lid_model_path, imagenet21k_synsets_path

        self.fasttext = fasttext.load_model(str(lid_model or fasttext_lid_model_path()))
        self.gcld3 = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
        ensure_nltk_wordnet()
        from nltk.corpus import wordnet

        self.wordnet = wordnet
        # DataComp keeps the ids in a list (a set changes nothing but the speed).
        self.entity_ids = [int(x.strip()[1:]) for x in open(imagenet21k_synsets_path()).readlines()]
        self.entity_set = set(self.entity_ids)

    def fasttext_language(self, text: str) -> str:
        text = text.replace("\n", " ")
        return self.fasttext.predict(text)[0][0].split("__label__")[1]

    def gcld3_language(self, text: str) -> str:
        text = text.replace("\n", " ")
        return self.gcld3.FindLanguage(text=text).language

    def contains_entity(self, text: str, *, nltk_381: bool = True) -> bool:
        morphy = self.wordnet._morphy
        if nltk_381:
            self.wordnet._morphy = lambda form, pos, check_exceptions=True: morphy_nltk_381(
                self.wordnet, form, pos, check_exceptions)
        try:
            for word in text.split():
                synsets = self.wordnet.synsets(word)
                if len(synsets) == 0:
                    continue
                if synsets[0].offset() in self.entity_set:
                    return True
            return False
        finally:
            self.wordnet._morphy = morphy


def morphy_nltk_381(wn, form, pos, check_exceptions=True):
    """WordNet's morphy as NLTK 3.8.1 (DataComp's environment) implements it: when one round of
    suffix rules finds nothing, keep applying them."""
    exceptions = wn._exception_map[pos]
    substitutions = wn.MORPHOLOGICAL_SUBSTITUTIONS[pos]

    def apply_rules(forms):
        return [form[:-len(old)] + new for form in forms for old, new in substitutions if form.endswith(old)]

    def filter_forms(forms):
        result = []
        for form in forms:
            if form in wn._lemma_pos_offset_map and pos in wn._lemma_pos_offset_map[form]:
                if form not in result:
                    result.append(form)
        return result

    if check_exceptions and form in exceptions:
        return filter_forms([form] + exceptions[form])
    forms = apply_rules([form])
    results = filter_forms([form] + forms)
    if results:
        return results
    rounds = 0
    while forms and rounds < 64:  # 3.8.1 has no limit; real words never need this many rounds
        forms = list(dict.fromkeys(apply_rules(forms)))
        results = filter_forms(forms)
        if results:
            return results
        rounds += 1
    return []


def fasttext_tokenize(text: str) -> list[str]:
    """fastText's ``tokenize`` (Dictionary::readWord), byte by byte."""
    tokens, word = [], bytearray()
    for byte in text.encode("utf-8"):
        if byte in b" \n\r\t\v\f\x00":
            if word:
                tokens.append(word.decode("utf-8"))
                word = bytearray()
            if byte == ord("\n"):
                tokens.append("</s>")
            continue
        word.append(byte)
    if word:
        tokens.append(word.decode("utf-8"))
    return tokens


# --- the baselines ----------------------------------------------------------------------------
def no_filter(pool: Path) -> np.ndarray:
    return _sorted([_uid_records(pd.read_parquet(p, columns=["uid"]).uid.values) for p in parquet_paths(pool)])


def basic(pool: Path, models: Models) -> np.ndarray:
    out = []
    for p in parquet_paths(pool):
        df = pd.read_parquet(p, columns=["uid", "text", "original_width", "original_height"])
        ok = df.text.apply(lambda x: x is not None)
        lang = df.text.apply(lambda x: models.fasttext_language(x) if x is not None else None)
        words = df.text.apply(lambda x: len(x.split()) if x is not None else 0)
        chars = df.text.apply(lambda x: len(x) if x is not None else 0)
        min_dim = np.minimum(df.original_width, df.original_height)
        max_dim = np.maximum(df.original_width, df.original_height)
        with np.errstate(divide="ignore", invalid="ignore"):
            aspect = max_dim / min_dim
        mask = ok & (lang == "en") & (words > 2) & (chars > 5) & (min_dim >= 200) & (aspect <= 3.0)
        out.append(_uid_records(df.uid[mask.to_numpy()].values))
    return _sorted(out)


def text_based(pool: Path, models: Models, *, nltk_381: bool = True) -> np.ndarray:
    out = []
    for p in parquet_paths(pool):
        df = pd.read_parquet(p, columns=["uid", "text"])
        lang = df.text.apply(lambda x: models.fasttext_language(x) if x is not None else None)
        hit = df.text.apply(lambda x: models.contains_entity(x, nltk_381=nltk_381) if x is not None else False)
        out.append(_uid_records(df.uid[((lang == "en") & (hit == True)).to_numpy()].values))  # noqa: E712
    return _sorted(out)


def get_threshold(pool: Path, key: str, fraction: float) -> float:
    df = pd.concat([pd.read_parquet(p, columns=[key]) for p in parquet_paths(pool)])
    n = int(len(df) * fraction)
    return -np.sort(-df[key].values)[n]


def clip_score(pool: Path, arch: str, *, threshold: float | None = None, fraction: float | None = None) -> np.ndarray:
    key = f"clip_{arch}_similarity_score"
    if threshold is None:
        threshold = get_threshold(pool, key, fraction)
    out = []
    for p in parquet_paths(pool):
        df = pd.read_parquet(p, columns=["uid", key])
        out.append(_uid_records(df[df[key] >= threshold]["uid"].values))
    return _sorted(out)


def laion2b(pool: Path, models: Models) -> np.ndarray:
    key = "clip_b32_similarity_score"
    out = []
    for p in parquet_paths(pool):
        df = pd.read_parquet(p, columns=["uid", "text", key])
        lang = df.text.apply(lambda x: models.gcld3_language(x) if x is not None else None)
        df = df[(lang == "en").to_numpy()]
        out.append(_uid_records(df[df[key] >= 0.28]["uid"].values))
    return _sorted(out)


def nearest_centroid_rowwise(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Per row, the argmax of the inner products computed exactly (math.fsum of exact float64
    products of float32 values), first index on ties: what DataComp's GPU argmax approximates."""
    import math

    c = centroids.astype(np.float32).astype(np.float64)
    out = []
    for row in embeddings:
        r = row.astype(np.float32).astype(np.float64)
        out.append(int(np.argmax([math.fsum(r * cj) for cj in c])))
    return np.array(out, dtype=np.int64)


def caption_filter(df: pd.DataFrame, models: Models) -> np.ndarray:
    ok = df.text.apply(lambda x: x is not None)
    num_words = df.text.apply(lambda x: len(fasttext_tokenize(x)) if x is not None else 0)
    num_chars = df.text.apply(lambda x: len(x) if x is not None else 0)
    en = df.text.apply(lambda x: models.fasttext_language(x) == "en" if x is not None else False)
    return (ok & en & (num_words > 1) & (num_chars > 5)).to_numpy()


def image_based(pool: Path, models: Models, centroids: np.ndarray, targets: np.ndarray, *,
                arch: str | None = None, threshold: float | None = None, fraction: float | None = None) -> np.ndarray:
    target_ids = set(np.unique(nearest_centroid_rowwise(targets, centroids)).tolist())
    key = f"clip_{arch}_similarity_score" if arch else None
    if key and threshold is None and fraction is not None:
        threshold = get_threshold(pool, key, fraction)
    out = []
    for p in parquet_paths(pool):
        df = pd.read_parquet(p, columns=["uid", "text"] + ([key] if key else []))
        emb = np.load(p.replace(".parquet", ".npz"))["l14_img"]
        if key:
            index = (df[key] >= threshold).to_numpy()
            df, emb = df[index], emb[index]
        mask = caption_filter(df, models) & np.array([bool(row.any()) for row in emb], dtype=bool)
        uids = df.uid.values[mask]
        labels = nearest_centroid_rowwise(emb[mask], centroids)
        out.append(_uid_records([u for u, lab in zip(uids, labels) if lab in target_ids]))
    return _sorted(out)
