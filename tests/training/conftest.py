"""Fixtures of the algorithm tests (their helpers: training_fixtures.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def sharp_tiny_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with embeddings × 6, so its next-token distributions are far from uniform
    (a random 64-wide model is otherwise nearly uniform over 49 k tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("sharp-tiny")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(6.0)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path

