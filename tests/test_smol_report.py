"""benchmarks/smol_report.py: the per-token adaptivity figures."""
import pytest

from helpers import load_script

smol_report = load_script("benchmarks/smol_report.py")


def test_adaptivity_averages_over_tokens_not_over_sequences():
    """Two sequences of 2 and 1 tokens: the mean counts every token once (3.0, not the mean of the
    sequences' means 3.5); the spread is within each sequence, averaged over sequences that have one."""
    figures = smol_report.adaptivity([[1, 3], [5]], {"digit": [1, 5], "punctuation": [3]})
    assert figures["blocks_per_token_mean"] == 3.0
    assert figures["blocks_per_token_std_within_sequence"] == 1.0
    assert figures["by_kind"] == {"digit": {"mean": 3.0, "n": 2}, "punctuation": {"mean": 3.0, "n": 1}}


@pytest.mark.parametrize("text, special, kind", [
    (" the", False, "word start"), ("ing", False, "word continuation"), ("42", False, "digit"),
    (".", False, "punctuation"), ("\n", False, "whitespace"), ("<|im_start|>", True, "template/special"),
])
def test_token_kinds(text, special, kind):
    assert smol_report.token_kind(text, special) == kind
