"""DataComp's LAION-2B reproduction: CLIP B/32 score >= 0.28 and CLD3 says English.

No length, size or fastText rule (reference section 2). CLD3 is unreliable on short
captions (it calls "a photo of a dog on the beach" Irish); that is the real filter's
behaviour and is kept. CLD3 runs only on rows whose score passes, since no other row can be
kept whatever CLD3 says (`pipeline.signals` stores null for the others).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from filters.clip_score import score_mask
from filters.language import Cld3Settings, Language, language_mask


@dataclass(frozen=True, kw_only=True)
class Laion2B:
    min_b32_score: float = 0.28
    language: Language = field(default_factory=Language)
    cld3: Cld3Settings = field(default_factory=Cld3Settings)


def cld3_needed(b32_scores: np.ndarray, p: Laion2B = Laion2B()) -> np.ndarray:
    """Rows whose CLD3 label can change the outcome (the score already passes)."""
    return score_mask(b32_scores, p.min_b32_score)


def laion_mask(b32_scores: np.ndarray, cld3_labels, p: Laion2B = Laion2B()) -> np.ndarray:
    return score_mask(b32_scores, p.min_b32_score) & language_mask(cld3_labels, p.language)
