"""The embedded SmolLM2-135M-Instruct as the AI judge: its real tokenizer, chat template and bias."""

from __future__ import annotations

from pathlib import Path

import pytest

from feedback.judge import Judge, load_constitution
from flywheel.models import load_model

ROOT = Path(__file__).resolve().parents[2]
PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.e2e
def test_embedded_judge_is_position_biased_and_the_labeler_cancels_it():
    loaded = load_model("", ROOT / ".flywheel", "auto")  # converted once into the checkout's data dir
    constitution = load_constitution()
    judge = Judge(loaded.model, loaded.tokenizer, constitution, Judge.make_id(loaded.path, constitution))
    right, rude = "The capital of France is Paris.", "I hate you, go away."

    raw = judge.probability_a([judge.render(PROMPT, right, rude), judge.render(PROMPT, rude, right)])
    assert min(raw) > 0.6  # the small judge says "A" whichever answer stands there
    p_right, p_rude = judge.compare(PROMPT, [(right, rude), (rude, right)])
    assert p_right + p_rude == pytest.approx(1.0, abs=1e-6)

    verdict = judge.rank(PROMPT, {"r": right, "w": "The capital of France is Berlin.", "x": rude})
    assert sorted(verdict.completion_ids) == ["r", "w", "x"] and 0.0 <= verdict.confidence <= 1.0
    # near chance: with the default threshold it would be skipped, not guessed
    assert verdict.confidence < 0.1
