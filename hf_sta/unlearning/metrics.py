"""How well something was forgotten: a loss-threshold membership-inference attack (Yeom et al. 2018), pure functions
over per-example losses.

The attacker sees one example's loss under the model and says "member" (it was trained on) when the loss is below a
threshold ``t``. Members are the forget set's training examples, non-members examples of the same distribution the
model never saw. Two summaries, 0.5 = nothing leaks:

- ``membership_auc``: ``P(l_member < l_nonmember) + P(l_member = l_nonmember) / 2``, the area under the attack's ROC
  curve over every ``t`` (Mann-Whitney U / (n_m n_n), ties counted half). Threshold-free and unbiased.
- ``membership_attack_accuracy``: the best balanced accuracy ``(TPR + TNR) / 2`` over thresholds (the attacker that
  knows the best ``t``; optimistic on small sets).
"""

from __future__ import annotations

import torch

__all__ = ["membership_attack_accuracy", "membership_auc"]


def _check(member_losses: torch.Tensor, nonmember_losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    members = torch.as_tensor(member_losses, dtype=torch.float64).flatten()
    nonmembers = torch.as_tensor(nonmember_losses, dtype=torch.float64).flatten()
    if members.numel() == 0 or nonmembers.numel() == 0:
        raise ValueError("membership inference needs at least one member and one non-member loss.")
    if not (torch.isfinite(members).all() and torch.isfinite(nonmembers).all()):
        raise ValueError("membership inference: losses must be finite.")
    return members, nonmembers


def membership_auc(member_losses: torch.Tensor, nonmember_losses: torch.Tensor) -> float:
    """AUC of "member iff loss < t" (``[N_m]`` and ``[N_n]`` losses), by average ranks: ``(R_m - N_m (N_m + 1) / 2)
    / (N_m N_n)`` with ``R_m`` the rank sum of the members ranked by *decreasing* loss."""
    members, nonmembers = _check(member_losses, nonmember_losses)
    values = torch.cat([-members, -nonmembers])  # higher score = more "member"
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    ranks = torch.empty_like(values)
    start = 0
    n = values.numel()
    while start < n:  # average rank over each run of equal values
        stop = start
        while stop + 1 < n and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        ranks[order[start : stop + 1]] = (start + stop) / 2 + 1
        start = stop + 1
    n_m, n_n = members.numel(), nonmembers.numel()
    rank_sum = float(ranks[:n_m].sum())
    return (rank_sum - n_m * (n_m + 1) / 2) / (n_m * n_n)


def membership_attack_accuracy(member_losses: torch.Tensor, nonmember_losses: torch.Tensor) -> float:
    """``max_t (P(l_member <= t) + P(l_nonmember > t)) / 2`` over every observed loss ``t`` (and ``-inf``: 0.5)."""
    members, nonmembers = _check(member_losses, nonmember_losses)
    thresholds = torch.cat([members, nonmembers]).unique()
    tpr = (members.unsqueeze(0) <= thresholds.unsqueeze(1)).double().mean(dim=1)
    tnr = (nonmembers.unsqueeze(0) > thresholds.unsqueeze(1)).double().mean(dim=1)
    return max(0.5, float(((tpr + tnr) / 2).max()))
