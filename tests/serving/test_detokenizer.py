import pytest

from serving.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def feed(tokenizer, text, stop=()):
    detok = IncrementalDetokenizer(tokenizer, tuple(stop))
    streamed = []
    for token in tokenizer(text, add_special_tokens=False).input_ids:
        detok.add(token)
        streamed.append(detok.take_delta())
        if detok.stopped:
            break
    streamed.append(detok.take_delta(final=True))
    return detok, "".join(streamed)


def test_incremental_text_equals_full_decode(tokenizer):
    text = "Héllo wörld — naïve café 東京 🙂 and more"
    detok, streamed = feed(tokenizer, text)
    assert detok.text == tokenizer.decode(detok.token_ids, skip_special_tokens=True)
    assert streamed == detok.text


def test_stop_string_truncates_and_is_never_streamed(tokenizer):
    detok, streamed = feed(tokenizer, "one two three END four five", stop=["END", "xyz"])
    assert detok.stopped
    assert detok.text == "one two three "
    assert streamed == detok.text and "EN" not in streamed


def test_logprob_token_texts_join_to_the_text_with_special_tokens(tokenizer):
    """A sampled special token is skipped in the text, so its logprob entry's text is "" too: the
    OpenAI contract that the tokens join to the text (CI once sampled <gh_stars> from a tiny model)."""
    from serving.logprobs import scored_tokens

    special = tokenizer.convert_tokens_to_ids(tokenizer.all_special_tokens[0])
    ids = tokenizer(" ul Type", add_special_tokens=False).input_ids + [special] + \
        tokenizer(" drama", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, ())
    for token in ids:
        detok.add(token)
    scored = scored_tokens(tokenizer, ids, [0.0] * len(ids), [[(special, -1.0)]] * len(ids))
    assert "".join(t.token for t in scored) == detok.text == " ul Type drama"
    assert scored[len(ids) - 2].token == "" and scored[0].top[0].token == ""
