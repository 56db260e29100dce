"""The measured part of a cell (``inference.measure``): how many passes reach a window, and
what a response counts past EOS."""
from __future__ import annotations

from llmenergy.inference.measure import _more, response_counts
from llmenergy.inference.tokenizer import default_tokenizer


def test_a_response_counts_every_generated_token_but_words_only_up_to_eos() -> None:
    tok = default_tokenizer()
    answer = tok.encode("three apples and two pears", bos=False, eos=False)
    tail = tok.encode("and then some more words", bos=False, eos=False)
    row = [*answer, tok.eos_id, *tail]
    text, tokens_out, words_out, after = response_counts(row, tok.eos_id, tok.decode)
    assert text == "three apples and two pears" and words_out == 5
    assert tokens_out == len(row)  # the GPU produced them all
    assert after == 1 + len(tail)  # the EOS and what followed it
    # no EOS: the whole row is the answer; a second EOS later changes nothing
    assert response_counts(answer, tok.eos_id, tok.decode) == (text, len(answer), 5, 0)
    twice = [*answer, tok.eos_id, *tail, tok.eos_id]
    assert response_counts(twice, tok.eos_id, tok.decode)[1:] == (len(twice), 5, 2 + len(tail))
    # EOS first: nothing to read, every token after it
    assert response_counts([tok.eos_id, *tail], tok.eos_id, tok.decode) == ("", 1 + len(tail), 0, 1 + len(tail))


def test_more_passes_reach_the_target_at_the_mean_pass_time() -> None:
    assert _more(20.0, 4.0, 1) == 4  # 16 s left at 4 s a pass
    assert _more(20.0, 19.0, 2) == 1  # at least one, never a partial pass
    assert _more(20.0, 20.0, 5) == 0 and _more(0.0, 0.0, 1) == 0  # reached (0: one pass only)
    assert _more(5.0, 0.0, 1) == 1  # nothing measurable yet: one more, then look again
