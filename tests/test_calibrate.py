"""Temperature scaling and the threshold rule, on data with a known answer."""

import numpy as np
import pytest
import torch

from imageorigin.calibrate import choose_threshold, fit_temperature


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 3, generator=gen) * 4  # (N, C)
    # labels drawn from softmax(logits / 2.5): the logits are 2.5x over-confident
    labels = torch.multinomial(torch.softmax(logits / 2.5, 1), 1, generator=gen).squeeze(1)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.1)


def test_threshold_flags_at_most_the_target_share_of_humans():
    rng = np.random.default_rng(0)
    p_ai = np.concatenate([rng.beta(2, 5, 200), rng.beta(5, 2, 300)])
    is_human = np.arange(500) < 200
    for target in (0.01, 0.05, 0.2):
        t = choose_threshold(p_ai, is_human, target)
        flagged = (p_ai[is_human] >= t).mean()
        assert flagged <= target
        assert flagged > target - 1 / 200  # the lowest such threshold: one more human would pass it


def test_threshold_needs_humans():
    with pytest.raises(ValueError, match="human"):
        choose_threshold(np.array([0.2, 0.9]), np.array([False, False]))
