"""Speculative decoding's general verifier: rejection sampling of a draft model's tokens against the target.

Draft d_j was drawn from q_j, the draft model's distribution at draft position j; p_j is the target's at the
same position, both after the request's own sampling processing (``Sampler.probabilities``). d_j stands with
probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection the token comes from max(0, p_j - q_j),
renormalized; when all k stand, the bonus token comes from p_k. The kept tokens are then distributed exactly
as drawing one token at a time from the target (Leviathan et al., Chen et al., 2023).

Worked example: p_0 = [0.5, 0.5], q_0 = [0.9, 0.1], d_0 = 0 stands with probability 0.5 / 0.9, else the
residual [0, 0.4] gives token 1: P(token 0) = 0.9 * 5/9 = 0.5.
"""

from __future__ import annotations

import torch


def rejection_sample(target_probs: torch.Tensor, draft_probs: torch.Tensor, drafts: list[int],
                     generator: torch.Generator) -> list[int]:
    """The accepted drafts and the token after them. ``target_probs`` [k + 1, vocab] and ``draft_probs``
    [k, vocab] are CPU fp32 rows, normalized; ``generator`` (CPU) gives every random number drawn."""
    num_drafts = len(drafts)
    positions = torch.arange(num_drafts)
    index = torch.tensor(drafts, dtype=torch.long)
    p, q = target_probs[positions, index], draft_probs[positions, index]
    uniform = torch.rand(num_drafts, generator=generator)
    # u < p / q without the division; q(d) > 0 because d was drawn from q.
    rejected = (uniform * q >= p).nonzero()
    num_accepted = int(rejected[0]) if len(rejected) else num_drafts
    if num_accepted == num_drafts:
        last = target_probs[num_drafts]
    else:
        last = (target_probs[num_accepted] - draft_probs[num_accepted]).clamp_min_(0.0)
        if not last.sum() > 0:  # p == q up to rounding: the rejection had probability ~0; p itself is exact
            last = target_probs[num_accepted]
    token = int(torch.multinomial(last, 1, generator=generator))
    return drafts[:num_accepted] + [token]
