"""MPO loss, its reward baseline delta, and a memory-light fused lm-head log-prob.

Mixed Preference Optimization (Wang et al. 2024, arXiv 2411.10442, section 4.1) trains on
(prompt, chosen, rejected) pairs with

    L = w_p * L_p + w_q * L_q + w_g * L_g                                   (paper eq. 4)

where L_p is DPO's sigmoid loss, L_q is BCO's loss with a reward baseline delta, and L_g the
SFT negative log-likelihood of the chosen response. This module holds three pieces:

* ``mpo_loss(...)``: the loss from per-sequence log-probs, a pure function.
* ``RewardBaseline``: the running value of delta, kept by the trainer across steps and rounds.
* ``fused_token_logps(hidden, weight, labels)``: per-token ``log softmax(hidden @ weight.T)[label]``
  without ever holding the (N, V) logits. At N=4,096, V=151,936, H=896 fp32 the plain autograd
  graph peaks at ~7.1 GB extra; this peaks at ~1.6 GB with the default 1 GiB of kept softmax rows
  (~1.1x the plain CPU time) or ~0.7 GB with keep_bytes=0, chunk_size=256 (~1.3x).

Typical use in a training step (one pair per row; ``seq_logps`` sums token log-probs per sequence)::

    tok = fused_token_logps(hidden, lm_head.weight, labels)          # (N,) zero at ignored tokens
    m = batch_reward_mean(pc, pr, rc_ref, rr_ref, beta=0.1)          # detached scalar
    # trainer: all-reduce m over workers first, then
    baseline.update(m.item())
    loss, stats = mpo_loss(pc, pr, rc_ref, rr_ref, chosen_nll, delta=baseline.value)

The reference implementation updates delta with the current batch *before* using it in the
loss (``running.update(rewards); delta = running.mean``); the order above reproduces that.
Only torch is imported, and only when this module is imported.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["mpo_loss", "batch_reward_mean", "RewardBaseline", "fused_token_logps",
           "DEFAULT_CHUNK_SIZE", "DEFAULT_KEEP_BYTES"]


# --------------------------------------------------------------------------------------------
# MPO loss
# --------------------------------------------------------------------------------------------

def _as_loss_dtype(x: torch.Tensor) -> torch.Tensor:
    # bf16 log-probs are summed over hundreds of tokens; do the loss arithmetic in >= fp32.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def batch_reward_mean(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      *, beta: float = 0.1) -> torch.Tensor:
    """Detached mean of the implicit rewards r = beta * (log pi - log pi_ref), chosen and rejected pooled.

    This is the per-step quantity delta tracks. All inputs (B,); returns a 0-dim tensor.
    """
    rc = beta * (_as_loss_dtype(policy_chosen_logps) - _as_loss_dtype(ref_chosen_logps))     # (B,)
    rr = beta * (_as_loss_dtype(policy_rejected_logps) - _as_loss_dtype(ref_rejected_logps))  # (B,)
    return torch.cat([rc, rr]).mean().detach()


def mpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, chosen_nll: torch.Tensor,
             *, beta: float = 0.1, w_pref: float = 0.8, w_quality: float = 0.2, w_gen: float = 1.0,
             delta: float | torch.Tensor = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MPO loss averaged over a batch of B preference pairs.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed log pi(y|x) over response tokens.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the frozen reference (detached here).
        chosen_nll: (B,) token-mean NLL of the chosen response under the policy, -log pi(yc|x) / |yc|.
        beta: DPO/BCO temperature. w_pref, w_quality, w_gen: term weights (any may be 0;
            DPO is (1, 0, 0)). delta: BCO reward baseline, usually ``RewardBaseline.value``.

    Returns:
        loss: 0-dim tensor with grad, the batch mean of the weighted per-pair loss.
        stats: dict of detached 0-dim float tensors (on the input device, dtype >= fp32), so the
            trainer can all-reduce them: loss, loss_pref, loss_quality, loss_gen (unweighted batch
            means), reward_chosen, reward_rejected (means of rc, rr), reward_margin (mean rc - rr),
            reward_accuracy (fraction rc > rr), reward_mean (mean of rc and rr pooled, what delta
            tracks), delta.
    """
    pc, pr = _as_loss_dtype(policy_chosen_logps), _as_loss_dtype(policy_rejected_logps)   # (B,)
    ref_c, ref_r = _as_loss_dtype(ref_chosen_logps).detach(), _as_loss_dtype(ref_rejected_logps).detach()
    nll = _as_loss_dtype(chosen_nll)                                                       # (B,)
    delta_t = torch.as_tensor(delta, dtype=pc.dtype, device=pc.device).detach()

    # Implicit rewards r = beta * log(pi / pi_ref)  (DPO eq. 5 of Rafailov et al.).
    rc = beta * (pc - ref_c)  # (B,)
    rr = beta * (pr - ref_r)  # (B,)

    # L_p = -log sigma(rc - rr)                                   (paper eq. 5, DPO sigmoid loss)
    loss_pref = -F.logsigmoid(rc - rr)                                                    # (B,)
    # L_q = -log sigma(rc - delta) - log sigma(-(rr - delta))     (paper eq. 6, BCO)
    loss_quality = -F.logsigmoid(rc - delta_t) - F.logsigmoid(-(rr - delta_t))            # (B,)
    # L_g = -log pi(yc|x) / |yc|                                  (paper eq. 7, SFT on chosen)
    loss_gen = nll                                                                        # (B,)

    # Skip zero-weighted terms in the graph (0 * inf would give nan for a degenerate term).
    per_pair = torch.zeros_like(rc)
    if w_pref:
        per_pair = per_pair + w_pref * loss_pref
    if w_quality:
        per_pair = per_pair + w_quality * loss_quality
    if w_gen:
        per_pair = per_pair + w_gen * loss_gen
    loss = per_pair.mean()  # (paper eq. 4, averaged over pairs)

    with torch.no_grad():
        stats = {
            "loss": loss.detach(),
            "loss_pref": loss_pref.mean(),
            "loss_quality": loss_quality.mean(),
            "loss_gen": loss_gen.mean(),
            "reward_chosen": rc.mean(),
            "reward_rejected": rr.mean(),
            "reward_margin": (rc - rr).mean(),
            "reward_accuracy": (rc > rr).to(rc.dtype).mean(),
            "reward_mean": torch.cat([rc, rr]).mean(),
            "delta": delta_t.clone(),
        }
        stats = {k: v.detach() for k, v in stats.items()}
    return loss, stats


# --------------------------------------------------------------------------------------------
# Reward baseline delta
# --------------------------------------------------------------------------------------------

class RewardBaseline:
    """Moving average of past batch-mean rewards: the delta of BCO's quality loss.

    mode="cumulative" (the MPO reference code): value = sum(count_k * m_k) / sum(count_k) over all
        updates so far; with count=1 per step this is the plain mean of the step means.
    mode="ema": value = decay * value + (1 - decay) * m; the first update sets value = m, so
        there is no bias towards the initial 0. ``count`` is ignored in this mode.
    Before any update value = 0.0 (the reference starts at 0).

    Pure Python floats, no torch. Cross-worker reduction is the trainer's job: all-reduce (mean)
    reward_mean over data-parallel workers, then call update() with the same value on every worker
    so all replicas keep the same delta. (The reference gathers per-rank means, i.e. it counts
    world_size per step; pass count=world_size to reproduce that weighting exactly.)
    Persist with state_dict()/load_state_dict() in checkpoints and across online rounds.
    """

    def __init__(self, mode: str = "cumulative", decay: float = 0.99):
        if mode not in ("cumulative", "ema"):
            raise ValueError(f"mode must be 'cumulative' or 'ema', got {mode!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.mode, self.decay = mode, float(decay)
        self.value = 0.0
        self.count = 0.0   # total weight seen (cumulative) or number of updates (ema)

    def update(self, batch_mean: float | torch.Tensor, count: float = 1) -> float:
        m = float(batch_mean)
        if not math.isfinite(m):
            raise ValueError(f"non-finite reward mean {m}")
        if self.mode == "cumulative":
            if count <= 0:
                raise ValueError("count must be positive")
            self.count += count
            self.value += (m - self.value) * count / self.count   # incremental weighted mean
        else:
            self.value = m if self.count == 0 else self.decay * self.value + (1.0 - self.decay) * m
            self.count += 1
        return self.value

    def state_dict(self) -> dict:
        return {"mode": self.mode, "decay": self.decay, "value": self.value, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mode, self.decay = state["mode"], float(state["decay"])
        self.value, self.count = float(state["value"]), float(state["count"])

    def __repr__(self) -> str:
        return f"RewardBaseline(mode={self.mode!r}, decay={self.decay}, value={self.value:.6g}, count={self.count:g})"


# --------------------------------------------------------------------------------------------
# Fused lm-head + log-softmax + gather
# --------------------------------------------------------------------------------------------

# Rows per (chunk, V) logits buffer; at V=151,936 one fp32 row is 0.58 MB. Tuned with
# benchmarks/fused_logps.py (N=4,096, 1 thread, CPU seconds; plain 37.0): with the default keep,
# chunk 256/512/1024/2048 -> 42.1/41.0/40.8/42.7 s (2048 also needs 2.8 GB); keep_bytes=0 ->
# 47.9/47.0/46.7/47.6 s at 0.70/0.85/1.15/1.74 GB. The matmuls dominate, so chunk size barely matters.
DEFAULT_CHUNK_SIZE = 1024
# Softmax rows kept from forward to backward, in bytes: those rows skip the backward recompute
# (1 of the 4 big matmuls). 0 = pure recompute (peak memory = one chunk + grad_weight).
DEFAULT_KEEP_BYTES = 1 << 30


def _chunks(n: int, n_kept: int, chunk: int) -> list[tuple[int, int, bool]]:
    """(start, end, kept) row ranges: rows [0, n - n_kept) recomputed, the last n_kept rows kept."""
    first_kept = n - n_kept
    out = [(s, min(s + chunk, first_kept), False) for s in range(0, first_kept, chunk)]
    return out + [(s, min(s + chunk, n), True) for s in range(first_kept, n, chunk)]


class _FusedTokenLogps(torch.autograd.Function):
    """out_i = logits_i[y_i] - logsumexp(logits_i), logits = hidden @ weight.T, chunk by chunk.

    Saves hidden, weight, labels and the per-row logsumexp (n,), plus the softmax of the last
    ``keep_bytes`` worth of rows; backward recomputes the other chunks' logits. With
    d out_i / d logits_i = onehot(y_i) - softmax_i, and G the (chunk, V) matrix g_i * (onehot - softmax):
    grad_hidden = G @ W and grad_weight = sum over chunks of G.T @ hidden.
    Cost: 3 + (recomputed rows / n) (n, V, H) matmuls, against 3 for the plain autograd graph.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, ignore_index, keep_bytes):
        n_all = hidden.shape[0]
        cdt = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        valid = labels != ignore_index                                         # (N,)
        # Compact to the rows that have a label: prompt / image / padding tokens cost nothing.
        all_valid = bool(valid.all())
        idx = None if all_valid else valid.nonzero().squeeze(1)                # (n,)
        h = hidden if all_valid else hidden.index_select(0, idx)               # (n, H)
        y = labels if all_valid else labels.index_select(0, idx)               # (n,)
        w = weight.to(cdt)       # (V, H); a one-off fp32 copy only when weight is bf16/fp16
        n, V = h.shape[0], w.shape[0]
        row_bytes = V * torch.finfo(cdt).bits // 8
        n_kept = min(n, keep_bytes // row_bytes)
        chunks = _chunks(n, n_kept, chunk_size)

        lse = torch.empty(n, dtype=cdt, device=h.device)                      # (n,)
        tgt = torch.empty(n, dtype=cdt, device=h.device)                      # (n,)
        kept, buf = [], None
        for s, e, keep in chunks:
            if keep:
                buf = None       # recompute buffer no longer needed: free it before keeping rows
                dst = torch.empty(e - s, V, dtype=cdt, device=h.device)       # (c, V)
            else:
                if buf is None:
                    buf = torch.empty(min(chunk_size, n - n_kept), V, dtype=cdt, device=h.device)
                dst = buf[: e - s]
            logits = torch.mm(h[s:e].to(cdt), w.t(), out=dst)                 # (c, V)
            tgt[s:e] = logits.gather(1, y[s:e, None]).squeeze(1)              # (c,)
            # logsumexp in place (torch.logsumexp would allocate another (c, V) temporary).
            m = logits.amax(dim=1)                                            # (c,)
            sum_exp = logits.sub_(m[:, None]).exp_().sum(dim=1)               # (c,)
            lse[s:e] = sum_exp.log() + m
            if keep:
                kept.append(logits.div_(sum_exp[:, None]))                    # (c, V) softmax
        del buf
        out_valid = tgt - lse                                                  # (n,)
        if all_valid:
            out = out_valid
        else:
            out = out_valid.new_zeros(n_all).index_copy_(0, idx, out_valid)   # (N,) 0 at ignored
        ctx.save_for_backward(hidden, weight, y, lse, idx)
        # Kept softmax rows live on ctx, not in save_for_backward, so backward can free them one
        # by one (and reuse one as its recompute buffer); a second backward recomputes instead.
        ctx.kept, ctx.chunks, ctx.cdt, ctx.all_valid = kept, chunks, cdt, all_valid
        return out   # in cdt (fp32 for bf16 inputs): these get summed over hundreds of tokens

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, y, lse, idx = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cdt, kept = ctx.cdt, ctx.kept
        ctx.kept = []
        g = grad_out.to(cdt)
        if not ctx.all_valid:
            g, h = g.index_select(0, idx), hidden.index_select(0, idx)         # (n,), (n, H)
        else:
            h = hidden
        w = weight.to(cdt)                                                     # (V, H)
        n, V = h.shape[0], w.shape[0]
        grad_h = torch.empty(n, h.shape[1], dtype=cdt, device=h.device) if need_h else None   # (n, H)
        grad_w = torch.zeros(V, h.shape[1], dtype=cdt, device=h.device) if need_w else None   # (V, H)
        spare = None                                                           # (>= c, V) buffer
        # Last chunks first: the kept softmax rows are used, then recycled as the recompute buffer.
        for s, e, keep in reversed(ctx.chunks):
            hc, gc = h[s:e].to(cdt), g[s:e]                                    # (c, H), (c,)
            if keep and kept:
                probs = kept.pop()                                             # (c, V) softmax
            elif not bool(gc.any()):
                probs = None
            else:
                if spare is None or spare.shape[0] < e - s:
                    spare = None                                               # free before growing
                    spare = torch.empty(e - s, V, dtype=cdt, device=h.device)
                probs = torch.mm(hc, w.t(), out=spare[: e - s])               # (c, V) logits
                probs.sub_(lse[s:e, None]).exp_()                             # (c, V) softmax
            if probs is None or not bool(gc.any()):
                if need_h:
                    grad_h[s:e].zero_()
            else:
                # G = g * (onehot - softmax), built in place.
                grad_logits = probs.mul_(-gc[:, None])                         # (c, V) = -g * softmax
                grad_logits[torch.arange(e - s, device=h.device), y[s:e]] += gc   # + g * onehot
                if need_h:
                    torch.mm(grad_logits, w, out=grad_h[s:e])                  # (c, H)
                if need_w:
                    grad_w.addmm_(grad_logits.t(), hc)                         # (V, H) += (V, c) @ (c, H)
            if probs is not None and probs is not spare and (spare is None or probs.shape[0] > spare.shape[0]):
                spare = probs                                                  # recycle kept memory
            del probs
        del spare
        gh = gw = None
        if need_h:
            gh = grad_h if ctx.all_valid else grad_h.new_zeros(hidden.shape).index_copy_(0, idx, grad_h)
            gh = gh.to(hidden.dtype)
        if need_w:
            gw = grad_w.to(weight.dtype)
        return gh, gw, None, None, None, None


def fused_token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                      chunk_size: int | None = None, ignore_index: int = -100,
                      keep_bytes: int | None = None) -> torch.Tensor:
    """Per-token log p(label) = log_softmax(hidden @ weight.T)[i, labels[i]], chunked.

    Args:
        hidden: (N, H) final hidden states (flatten (B, T, H) first; shift labels yourself).
        weight: (V, H) lm-head weight; may be frozen (requires_grad=False) or bf16.
        labels: (N,) int64 token ids; ``ignore_index`` rows give 0 and no gradient.
        chunk_size: rows per (chunk, V) logits buffer; None -> DEFAULT_CHUNK_SIZE.
        keep_bytes: softmax bytes kept from forward for backward (skips their recompute);
            None -> DEFAULT_KEEP_BYTES, 0 -> recompute everything. Unused when no grad is needed.
    Returns:
        (N,) log-probs in fp32 (fp64 if inputs are fp64), also for bf16 inputs. Gradients flow
        to hidden and weight (if they need them) in their own dtypes.

    Peak extra memory: max(one fp32 (chunk, V) buffer, keep_bytes) + grad_weight (V, H) in backward
    (+ an fp32 copy of weight when it is bf16/fp16), instead of several (N, V) tensors.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(f"expected hidden (N, H), weight (V, H), labels (N,); got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")
    if hidden.shape[0] != labels.shape[0] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
                         f"labels {tuple(labels.shape)}")
    chunk = int(chunk_size or DEFAULT_CHUNK_SIZE)
    if chunk <= 0:
        raise ValueError("chunk_size must be positive")
    keep = DEFAULT_KEEP_BYTES if keep_bytes is None else int(keep_bytes)
    if keep < 0:
        raise ValueError("keep_bytes must be >= 0")
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        keep = 0   # no backward will come (reference model, no_grad): keep nothing
    return _FusedTokenLogps.apply(hidden.contiguous(), weight, labels.long(), chunk, ignore_index, keep)
