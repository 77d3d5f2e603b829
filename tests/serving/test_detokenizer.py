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
