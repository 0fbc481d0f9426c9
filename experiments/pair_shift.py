"""Diagnostic: how did a round's update move the log-probs of the pairs it trained on?

For the first --pairs pairs of a round (rounds/round_NNNN/pairs.parquet of a run), scores the chosen and rejected
responses under the round's starting policy and under each policy given after it, with the trainer's own batching
and per-token log-probs (fp32, no Ray), and prints per policy:

- the decision token: the first token where chosen and rejected differ (same context in both), its mean log-prob
  on the chosen side and on the rejected side, the mean probability left for every other token at that position,
  and how often the chosen token is the likelier of the two;
- the chosen response: mean summed log-prob, and the mean per-token change against the starting policy, split into
  the decision token, tokens with the rejected decision token's id elsewhere in the chosen response, and the rest.

With --grad-norms it also prints, at the starting policy (where every reward is 0), the gradient norm of each of
MPO's weighted terms over micro-batches of 8 pairs (rewards on the first differing token, as in learning_curve.yaml).

This is what showed why MPO trailed RFT here (docs/experiments.md, "Why MPO trailed RFT, and `mpo.sft_paired`"). Usage:
  python experiments/pair_shift.py runs/X/rounds/round_0001 runs/X/policies/v0000 runs/X/policies/v0001 runs/Y/...
The first policy is the one that sampled the round (the reference); run directories are not modified.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def score(policy_dir: str, rows: list[dict]) -> list[tuple[list[float], list[float]]]:
    """Per pair: (chosen per-token log-probs, rejected per-token log-probs) under `policy_dir`."""
    from mpo_online.trainer.batching import PairCollator
    from mpo_online.trainer.logps import load_model
    from mpo_online.trainer.parity import _score, _targets

    model = load_model(policy_dir)
    collator = PairCollator.from_pretrained(policy_dir, max_length=2048, pairs=True)
    out = []
    for _, batch, logps in _score(collator, model, rows):
        B = batch.n_pairs
        out.extend((_targets(batch, logps, b)[1], _targets(batch, logps, B + b)[1]) for b in range(B))
    return out


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def report(rows: list[dict], base: list, scored: list) -> dict:
    """The figures of the module docstring for one policy (`scored`) against the starting policy (`base`)."""
    from mpo_online.trainer.batching import first_difference

    dc, dr, other, likelier, seq, at_d, same_id, rest = [], [], [], [], [], [], [], []
    for row, (c0, _), (c1, r1) in zip(rows, base, scored):
        c, r = row["chosen_token_ids"], row["rejected_token_ids"]
        d = first_difference(c, r)
        if d >= min(len(c1), len(r1)):
            continue  # one response is a prefix of the other: no decision token
        dc.append(c1[d])
        dr.append(r1[d])
        other.append(1.0 - math.exp(c1[d]) - math.exp(r1[d]))
        likelier.append(c1[d] > r1[d])
        seq.append(sum(c1))
        for j, (a, b) in enumerate(zip(c0, c1)):
            (at_d if j == d else same_id if c[j] == r[d] else rest).append(b - a)
    return {"pairs": len(dc), "decision_logp_chosen": mean(dc), "decision_logp_rejected": mean(dr),
            "decision_p_other": mean(other), "decision_chosen_likelier": mean(likelier), "chosen_seq_logp": mean(seq),
            "chosen_dlogp_at_decision": mean(at_d), "chosen_dlogp_same_id_as_rejected": mean(same_id),
            "chosen_dlogp_rest": mean(rest)}


def term_grad_norms(policy_dir: str, rows: list[dict], *, beta=0.1, weights=(0.8, 0.2, 1.0), micro=8) -> dict:
    """Mean over micro-batches of ||d(w * term)/d(params)|| for MPO's three terms at `policy_dir`
    (reference = policy)."""
    import torch

    from mpo_online.trainer.batching import PairCollator
    from mpo_online.trainer.logps import load_model, sequence_logps
    from mpo_online.trainer.losses import mpo_loss

    model = load_model(policy_dir)
    collator = PairCollator.from_pretrained(policy_dir, max_length=2048, pairs=True, pref_span="first_diff_token")
    params = [p for p in model.parameters() if p.requires_grad]
    norms = {"pref": [], "quality": [], "gen": []}
    for i in range(0, len(rows), micro):
        batch = collator(rows[i:i + micro])
        B = batch.n_pairs
        sum_lp, nll, _ = sequence_logps(model, batch.tensors)               # (2B,) each
        for j, name in enumerate(norms):
            w = [0.0, 0.0, 0.0]
            w[j] = weights[j]
            loss, _ = mpo_loss(sum_lp[:B], sum_lp[B:], sum_lp[:B].detach(), sum_lp[B:].detach(), nll[:B], beta=beta,
                               w_pref=w[0], w_quality=w[1], w_gen=w[2], delta=0.0)
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            norms[name].append(float(torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None))))
    return {k: mean(v) for k, v in norms.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("round_dir")
    p.add_argument("policies", nargs="+", help="the round's starting policy first, then the policies to compare")
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--grad-norms", action="store_true", help="also MPO's per-term gradient norms (first 64 pairs)")
    a = p.parse_args()

    import pyarrow.parquet as pq
    import torch
    torch.set_num_threads(1)
    rows = [r for r in pq.read_table(os.path.join(a.round_dir, "pairs.parquet")).to_pylist()
            if r.get("chosen_token_ids") and r.get("rejected_token_ids") and r["kind"] != "dropout_ntp"][:a.pairs]
    base = score(a.policies[0], rows)
    for policy in a.policies:
        rep = report(rows, base, base if policy == a.policies[0] else score(policy, rows))
        print(policy, " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in rep.items()))
    if a.grad_norms:
        norms = term_grad_norms(a.policies[0], rows[:64])
        print("grad norms at", a.policies[0], " ".join(f"{k}={v:.3f}" for k, v in norms.items()))


if __name__ == "__main__":
    main()
