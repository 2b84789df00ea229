"""Repetition and cap statistics (peagle.textstats) on fixed token sequences."""

import pytest

from peagle.textstats import compare_to_reference, repeated_ngram_fraction, response_stats


def test_repeated_ngram_fraction_counts_earlier_occurrences():
    assert repeated_ngram_fraction([1, 2, 3, 4, 1, 2, 3, 4], 4) == pytest.approx(1 / 5)
    assert repeated_ngram_fraction([7] * 10, 4) == pytest.approx(6 / 7)  # a loop: all but the first
    assert repeated_ngram_fraction(list(range(10)), 4) == 0.0
    assert repeated_ngram_fraction([1, 2, 3], 4) is None  # no 4-gram at all
    assert repeated_ngram_fraction([1, 2, 1, 2, 1], 2) == pytest.approx(2 / 4)


def test_response_stats_cap_rate_needs_length_and_no_eos():
    eos = 0
    seqs = [[5, 6, 7, 8, 9, eos],        # ended
            [5, 5, 5, 5, 5, 5],          # at the cap of 6, no eos: a cap hit
            [1, 2, 3, 4, 5, 6, 7, eos],  # past the cap but ended: not a hit
            [1, 2]]                      # short, no 4-gram: left out of the repetition mean
    s = response_stats(seqs, eos_ids=[eos], cap=6)
    assert s["cap_hits"] == 1 and s["cap_rate"] == pytest.approx(0.25)
    assert s["repetition"] == pytest.approx((0 + 2 / 3 + 0) / 3)
    assert s["n"] == 4 and s["max_len"] == 8 and s["mean_len"] == pytest.approx(22 / 4)
    assert "cap_rate" not in response_stats(seqs)  # reference texts: no cap


def test_compare_to_reference_ratio_and_verdicts():
    gen = {"repetition": 0.15, "cap_rate": 0.05}
    v = compare_to_reference(gen, {"repetition": 0.1})
    assert v["repetition_ratio"] == pytest.approx(1.5) and v["repetition_ok"] and v["cap_ok"]
    v = compare_to_reference({"repetition": 0.5, "cap_rate": 0.5}, {"repetition": 0.1})
    assert not v["repetition_ok"] and not v["cap_ok"]
    assert compare_to_reference({"repetition": 0.1}, {"repetition": 0.0})["repetition_ratio"] == float("inf")
    with pytest.raises(ValueError):
        response_stats([])


def test_copy_accuracy_splits_copied_tokens_from_the_rest():
    from peagle.textstats import copy_accuracy

    got = copy_accuracy([([1, 7, 3], [1, 9, 3], {9}), ([9, 4], [9, 5], {9, 2})])
    assert got == {"copy_accuracy": 0.5, "copy_tokens": 2, "other_accuracy": 2 / 3, "other_tokens": 3}
    assert copy_accuracy([([1], [1], set())])["copy_accuracy"] is None  # nothing to copy: no accuracy
    with pytest.raises(ValueError, match="2 predictions for 3 target tokens"):
        copy_accuracy([([1, 2], [1, 2, 3], {3})])


def test_number_tokens_are_the_prompts_digit_tokens():
    from peagle.target.quality import number_token_ids
    from peagle.target.tokenizer import train_tokenizer

    tok = train_tokenizer(["Take the ages 8, 13, 21. If an age is odd, keep it."] * 4, 300)
    ids = tok("Take the ages 8, 13, 21.", add_special_tokens=False)["input_ids"]
    assert sorted(tok.decode([i]) for i in number_token_ids(tok, ids)) == [" 13", " 21", " 8"]
