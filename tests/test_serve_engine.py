"""Reading a batch row: where it finished, how many tokens it took, why it stopped."""

from __future__ import annotations

from serve_helpers import char_tokenizer

from tinygptv.serve.engine import _read_row


def test_rows_finish_at_a_stop_string_at_eos_or_at_the_limit():
    tok = char_tokenizer()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ids = tok("red###ab")["input_ids"]
    # a stop string, then padding (pad == eos, as with Phi-2's tokenizer, or a separate pad token)
    for filler in (eos, pad):
        assert _read_row(tok, ids[:6] + [filler] * 4, [eos], ["###"]) == ("red", 6, "stop")
    assert _read_row(tok, ids, [eos], ["###"]) == ("red", 6, "stop")  # text after the stop is cut
    assert _read_row(tok, ids[:2] + [eos] + [pad] * 3, [eos], ["###"]) == ("re", 3, "stop")  # EOS counts
    assert _read_row(tok, ids[:5], [eos], ["###"]) == ("red##", 5, "length")  # never finished
    assert _read_row(tok, tok("a#b###")["input_ids"], [eos], ["###", "b"]) == ("a#", 3, "stop")
