"""Temperature scaling and the AI-vs-human decision threshold.

Both are fitted on held-out predictions (never on the data a report is about)
and stored in the checkpoint, so every caller of ``predict`` gets calibrated
probabilities and the same ``is_ai`` decision.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T > 0 minimising the cross-entropy of softmax(logits / T).

    logits: (N, C) held-out logits; labels: (N,) true class indices.
    """
    logits = logits.detach().cpu().double()
    labels = labels.cpu().long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # optimise log T: keeps T > 0
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def choose_threshold(p_ai: np.ndarray, is_human: np.ndarray, target_fpr: float = 0.05) -> float:
    """The lowest p_ai threshold that flags at most ``target_fpr`` of the human images.

    p_ai: (N,) held-out scores; is_human: (N,) bool.  An image is flagged as AI
    when ``p_ai >= threshold``.
    """
    human = np.sort(np.asarray(p_ai, dtype=np.float64)[np.asarray(is_human, bool)])[::-1]
    if len(human) == 0:
        raise ValueError("choosing a threshold needs held-out human images")
    allowed = int(np.floor(target_fpr * len(human)))  # human images we may flag
    if allowed >= len(human):
        return 0.0
    # Halfway between the (allowed+1)-th and the allowed-th highest human score:
    # exactly `allowed` are at or above it, with a margin, so that the float
    # noise of recomputing a score (another batch, another engine) cannot flip one.
    upper = human[allowed - 1] if allowed > 0 else min(1.0, human[0] + 1e-3)
    return float((human[allowed] + upper) / 2) if upper > human[allowed] \
        else float(np.nextafter(human[allowed], np.inf))
