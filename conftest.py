"""Shared test fixtures: small corpora built on the spot, so no test needs a download."""

import random

import pytest
import torch

torch.set_num_threads(2)


def write_corpus(path, words, lines, seed=0):
    """Lines of 3-12 words drawn with Zipf-like frequencies: text with real token statistics."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(words))]
    text = "\n".join(" ".join(rng.choices(words, weights, k=rng.randint(3, 12))) for _ in range(lines))
    path.write_text(text + "\n", encoding="utf-8")
    return path


@pytest.fixture
def char_corpus(tmp_path):
    """About 25,000 characters of lower-case pseudo-English."""
    words = ["the", "king", "and", "queen", "of", "rome", "speak", "now", "my", "lord", "good", "night", "to", "be"]
    return write_corpus(tmp_path / "corpus.txt", words, 600)


@pytest.fixture
def word_corpus(tmp_path):
    """Enough distinct words (2,000) for the seed report's 1,000-entry vocabulary."""
    return write_corpus(tmp_path / "words.txt", [f"w{i}" for i in range(2000)], 3000)
