"""pipeline.models: model calls remembered across files."""

from pipeline.models import MemoLabeler


def test_memo_labeler_stays_bounded_and_answers_every_text():
    """A call whose new texts overflow the memo clears it and still labels the texts it had
    remembered (an 8M-row pool once hit a KeyError there)."""
    calls = []

    def top1(texts):
        calls.append(list(texts))
        return [t.upper() for t in texts]

    label = MemoLabeler(top1, max_entries=4)
    assert label(["a", "b", "a"]) == ["A", "B", "A"]
    assert calls == [["a", "b"]]  # each distinct text once
    assert label(["a", "c"]) == ["A", "C"] and calls[-1] == ["c"]  # "a" remembered
    assert label(["a", "d", "e", "f"]) == ["A", "D", "E", "F"]  # 3 + 3 > 4: cleared, "a" asked again
    assert calls[-1] == ["a", "d", "e", "f"]
    assert len(label._memo) <= 4
