"""Tests for mpo_online.trainer.losses: the MPO loss, the reward baseline delta, and fused_token_logps.

Expected values are worked out by hand in each docstring (L(x) := -log sigmoid(x) = log(1 + e^-x)).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from mpo_online.trainer.losses import RewardBaseline, batch_reward_mean, fused_token_logps, mpo_loss

LN2 = math.log(2.0)


def _t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# ------------------------------------------------------------------------------------ mpo_loss

def test_step0_policy_equals_reference():
    """Policy == reference: rc = rr = 0.
    L_p = L(0) = ln 2 = 0.693147; L_q (delta=0) = L(0) + L(0) = 2 ln 2 = 1.386294;
    with chosen_nll = 2.0: total = 0.8 ln2 + 0.2 * 2 ln2 + 1.0 * 2.0 = 1.2 ln2 + 2 = 2.831777.
    """
    lp = _t(-20.0, -35.0)
    loss, st = mpo_loss(lp, lp - 3, lp, lp - 3, _t(2.0, 2.0))
    assert st["loss_pref"].item() == pytest.approx(0.693147, abs=1e-6)
    assert st["loss_quality"].item() == pytest.approx(1.386294, abs=1e-6)
    assert st["loss_gen"].item() == pytest.approx(2.0)
    assert loss.item() == pytest.approx(2.831777, abs=1e-6)
    assert st["reward_mean"].item() == 0.0 and st["reward_accuracy"].item() == 0.0


def test_nontrivial_values_and_batch_mean():
    """Pair 1: beta=0.1, pc=-10, pr=-14, ref_c=-12, ref_r=-13, nll=1.5
        rc = 0.1*(-10+12) = 0.2, rr = 0.1*(-14+13) = -0.1, margin 0.3
        L_p = log(1 + e^-0.3) = log(1.740818) = 0.554355
        L_q = L(0.2) + L(-(-0.1)) = log(1.818731) + log(1.904837) = 0.598139 + 0.644397 = 1.242536
        pair loss = 0.8*0.554355 + 0.2*1.242536 + 1.5 = 0.443484 + 0.248507 + 1.5 = 2.191991
    Pair 2: policy == reference, nll=2.0 -> 1.2 ln2 + 2 = 2.831777 (see step-0 test).
    Batch: loss = (2.191991 + 2.831777)/2 = 2.511884; reward_chosen = 0.1, reward_rejected = -0.05,
    margin = 0.15, accuracy = 1/2 (0 > 0 is false), reward_mean = (0.2 - 0.1 + 0 + 0)/4 = 0.025.
    """
    pc, pr, ref_c, ref_r = _t(-10.0, -5.0), _t(-14.0, -6.0), _t(-12.0, -5.0), _t(-13.0, -6.0)
    loss, st = mpo_loss(pc, pr, ref_c, ref_r, _t(1.5, 2.0), beta=0.1)
    assert loss.item() == pytest.approx(2.511884, abs=1e-6)
    assert st["loss_pref"].item() == pytest.approx((0.554355 + LN2) / 2, abs=1e-6)
    assert st["loss_quality"].item() == pytest.approx((1.242536 + 2 * LN2) / 2, abs=1e-6)
    assert st["reward_chosen"].item() == pytest.approx(0.1)
    assert st["reward_rejected"].item() == pytest.approx(-0.05)
    assert st["reward_margin"].item() == pytest.approx(0.15)
    assert st["reward_accuracy"].item() == 0.5
    assert st["reward_mean"].item() == pytest.approx(0.025)
    assert batch_reward_mean(pc, pr, ref_c, ref_r, beta=0.1).item() == pytest.approx(0.025)
    assert all(not v.requires_grad and v.dim() == 0 for v in st.values())


def test_delta_shifts_quality_term():
    """Pair 1 above with delta = 0.05: rc - delta = 0.15, -(rr - delta) = 0.15, so
    L_q = 2 log(1 + e^-0.15) = 2 log(1.860708) = 2 * 0.620957 = 1.241914 (was 1.242536 at delta=0).
    L_p and L_g do not depend on delta: total = 0.443484 + 0.2*1.241914 + 1.5 = 2.191867.
    """
    args = (_t(-10.0), _t(-14.0), _t(-12.0), _t(-13.0), _t(1.5))
    loss0, st0 = mpo_loss(*args, delta=0.0)
    loss, st = mpo_loss(*args, delta=torch.tensor(0.05))
    assert st0["loss_quality"].item() == pytest.approx(1.242536, abs=1e-6)
    assert st["loss_quality"].item() == pytest.approx(1.241914, abs=1e-6)
    assert st["loss_pref"].item() == st0["loss_pref"].item()
    assert loss.item() == pytest.approx(2.191867, abs=1e-6)
    assert st["delta"].item() == pytest.approx(0.05)


def test_dpo_weights_equal_sigmoid_dpo():
    """(w_p, w_q, w_g) = (1, 0, 0) is DPO: mean of log(1 + exp(-beta*((pc-ref_c) - (pr-ref_r)))).
    Pair 1 above at beta=0.1: log(1 + e^-0.3) = 0.554355; with beta=0.5 on pair (pc-ref_c=1, pr-ref_r=-3):
    log(1 + e^-2) = log(1.135335) = 0.126928. Mean = 0.340642. A huge nll must not leak in.
    """
    pc, pr, ref_c, ref_r = _t(-10.0, -1.0), _t(-14.0, -6.0), _t(-12.0, -2.0), _t(-13.0, -3.0)
    nll = _t(1e6, 1e6)
    l1, _ = mpo_loss(pc[:1], pr[:1], ref_c[:1], ref_r[:1], nll[:1], beta=0.1, w_pref=1, w_quality=0, w_gen=0)
    l2, _ = mpo_loss(pc[1:], pr[1:], ref_c[1:], ref_r[1:], nll[1:], beta=0.5, w_pref=1, w_quality=0, w_gen=0)
    assert l1.item() == pytest.approx(0.554355, abs=1e-6)
    assert l2.item() == pytest.approx(0.126928, abs=1e-6)
    beta = 0.3
    loss, _ = mpo_loss(pc, pr, ref_c, ref_r, nll, beta=beta, w_pref=1, w_quality=0, w_gen=0)
    plain = torch.log1p(torch.exp(-beta * ((pc - ref_c) - (pr - ref_r)))).mean()
    assert loss.item() == pytest.approx(plain.item(), rel=1e-12)


def test_gradient_direction_and_value_at_step0():
    """At rc = rr = 0 with B = 2 pairs, per pair:
    dL_p/dpc = -beta * sigmoid(-(rc - rr)) = -0.05;  dL_q/dpc = -beta * sigmoid(-rc) = -0.05
    dL_p/dpr = +0.05;                                dL_q/dpr = +beta * sigmoid(rr) = +0.05
    so dL/dpc = (0.8 + 0.2) * -0.05 / 2 = -0.025, dL/dpr = +0.025, dL/dnll = 1.0 / 2 = 0.5,
    and the reference log-probs get no gradient. Raising the chosen log-prob lowers the loss.
    """
    pc, pr = _t(-8.0, -9.0).requires_grad_(), _t(-7.0, -11.0).requires_grad_()
    ref_c, ref_r = pc.detach().clone().requires_grad_(), pr.detach().clone().requires_grad_()
    nll = _t(1.0, 1.2).requires_grad_()
    loss, _ = mpo_loss(pc, pr, ref_c, ref_r, nll)
    loss.backward()
    torch.testing.assert_close(pc.grad, _t(-0.025, -0.025))
    torch.testing.assert_close(pr.grad, _t(0.025, 0.025))
    torch.testing.assert_close(nll.grad, _t(0.5, 0.5))
    assert ref_c.grad is None and ref_r.grad is None
    loss_up, _ = mpo_loss(pc.detach() + 0.1, pr.detach(), ref_c.detach(), ref_r.detach(), nll.detach())
    assert loss_up.item() < loss.item()


# ------------------------------------------------------------------------------------ RewardBaseline

def test_reward_baseline_cumulative_and_ema():
    """cumulative: updates 0.2, 0.4, 0.9 -> 0.2, (0.2+0.4)/2 = 0.3, (0.2+0.4+0.9)/3 = 0.5;
    then update(0.1, count=2): (1.5 + 0.2)/5 = 0.34 (count-weighted).
    ema decay 0.9: updates 1.0, 0.0, 2.0 -> 1.0 (first sets), 0.9*1.0 + 0.1*0 = 0.9,
    0.9*0.9 + 0.1*2.0 = 1.01. Value before any update is 0.0.
    """
    b = RewardBaseline("cumulative")
    assert b.value == 0.0
    assert [b.update(x) for x in (0.2, 0.4, 0.9)] == pytest.approx([0.2, 0.3, 0.5])
    assert b.update(torch.tensor(0.1), count=2) == pytest.approx(0.34)
    e = RewardBaseline("ema", decay=0.9)
    assert [e.update(x) for x in (1.0, 0.0, 2.0)] == pytest.approx([1.0, 0.9, 1.01])
    with pytest.raises(ValueError):
        RewardBaseline("median")


def test_reward_baseline_state_dict_round_trip():
    """Restoring a cumulative baseline after 0.2, 0.4 (value 0.3, count 2) and updating with 0.9
    gives 0.5, exactly as if it had never been saved; mode and decay survive too.
    """
    a = RewardBaseline("cumulative")
    a.update(0.2), a.update(0.4)
    b = RewardBaseline("ema", decay=0.5)
    b.load_state_dict(a.state_dict())
    assert (b.mode, b.value, b.count) == ("cumulative", pytest.approx(0.3), 2.0)
    assert b.update(0.9) == pytest.approx(0.5) == a.update(0.9)
    e = RewardBaseline("ema", decay=0.8)
    e.update(1.0)
    f = RewardBaseline()
    f.load_state_dict(e.state_dict())
    assert f.update(2.0) == pytest.approx(0.8 * 1.0 + 0.2 * 2.0) == e.update(2.0)


# ------------------------------------------------------------------------------------ fused_token_logps

def _plain(hidden, weight, labels, ignore_index=-100):
    logp = torch.log_softmax(hidden @ weight.t(), dim=-1)                    # (N, V)
    valid = labels != ignore_index
    return logp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1) * valid   # (N,)


def _compare(N, H, V, chunk, dtype, tol, ignore=(), weight_grad=True, seed=0, keep_bytes=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, dtype=dtype, generator=g)
    w = torch.randn(V, H, dtype=dtype, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    y[list(ignore)] = -100
    up = torch.randn(N, dtype=dtype, generator=g)                           # upstream grad
    results = []
    for fn in (lambda a, b: fused_token_logps(a, b, y, chunk_size=chunk, keep_bytes=keep_bytes),
               lambda a, b: _plain(a, b, y)):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_(weight_grad)
        out = fn(hh, ww)
        (out * up).sum().backward()
        results.append((out.detach(), hh.grad, ww.grad))
    (o1, gh1, gw1), (o2, gh2, gw2) = results
    torch.testing.assert_close(o1, o2, **tol)
    torch.testing.assert_close(gh1, gh2, **tol)
    if weight_grad:
        torch.testing.assert_close(gw1, gw2, **tol)
    else:
        assert gw1 is None and gw2 is None
    return o1, gh1, gw1


def test_fused_hand_worked_example():
    """H=1, weight rows (0, 1, 2), hidden = ln 2: logits = (0, ln2, 2 ln2), exp = (1, 2, 4), sum 7.
    label 2: log p = ln(4/7) = -0.559616. softmax p = (1/7, 2/7, 4/7).
    d/dh = w_y - sum_v p_v w_v = 2 - (0 + 2/7 + 8/7) = 4/7 = 0.571429.
    d/dW_v = (onehot_v - p_v) * h = (-1/7, -2/7, 3/7) * ln2 = (-0.099021, -0.198042, 0.297063).
    A second, ignored row (label -100) gives 0 and zero gradient.
    """
    h = torch.tensor([[LN2], [5.0]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64, requires_grad=True)
    out = fused_token_logps(h, w, torch.tensor([2, -100]), chunk_size=1)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), _t(-0.559616, 0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(h.grad, torch.tensor([[4 / 7], [0.0]], dtype=torch.float64))
    torch.testing.assert_close(w.grad, torch.tensor([[-1 / 7], [-2 / 7], [3 / 7]], dtype=torch.float64) * LN2)


ROW64 = 50 * 8   # bytes of one float64 softmax row at V = 50


@pytest.mark.parametrize("keep_rows", [0, 10, 100])
@pytest.mark.parametrize("N,chunk", [(32, 8), (37, 8), (37, 1), (37, 64)])
def test_fused_matches_plain_float64(N, chunk, keep_rows):
    """Chunks dividing N (32/8), not dividing (37/8), one row each, one chunk bigger than N; with
    nothing kept (all recomputed), the last 10 rows' softmax kept (mixed), or every row kept."""
    _compare(N, 12, 50, chunk, torch.float64, dict(rtol=1e-10, atol=1e-10), keep_bytes=keep_rows * ROW64)


@pytest.mark.parametrize("keep_bytes", [0, None])
def test_fused_matches_plain_float32(keep_bytes):
    _compare(70, 64, 1000, 16, torch.float32, dict(rtol=1e-4, atol=1e-4), keep_bytes=keep_bytes)


def test_fused_backward_twice_recomputes():
    """retain_graph: the first backward consumes the kept softmax rows, the second recomputes them;
    both give the same gradient (the second accumulates: 2x)."""
    h = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    out = fused_token_logps(h, w, torch.randint(0, 6, (9,)), chunk_size=2, keep_bytes=5 * 6 * 8)
    out.sum().backward(retain_graph=True)
    g1 = w.grad.clone()
    out.sum().backward()
    torch.testing.assert_close(w.grad, 2 * g1)


def test_fused_ignore_index_rows_are_zero():
    """Rows 0, 5, 6 and 36 are ignored: value exactly 0, grad rows exactly 0; a chunk (rows 4..7 at
    chunk 4 -> rows 4,7 valid) mixing both still matches plain."""
    ignored = [0, 5, 6, 36]
    for keep in (0, 10 * ROW64):
        out, gh, _ = _compare(37, 12, 50, 4, torch.float64, dict(rtol=1e-10, atol=1e-10), ignore=ignored,
                              keep_bytes=keep)
        assert torch.all(out[ignored] == 0) and torch.all(gh[ignored] == 0)
        assert torch.all(out[[1, 2, 3, 4, 7]] < 0)


def test_fused_all_ignored_and_custom_ignore_index():
    """All rows ignored -> zeros and zero grads; ignore_index=0 treats token 0 as padding."""
    h = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    out = fused_token_logps(h, w, torch.full((5,), -100))
    out.sum().backward()
    assert torch.all(out == 0) and torch.all(h.grad == 0) and torch.all(w.grad == 0)
    y = torch.tensor([0, 3, 0, 6, 1])
    out = fused_token_logps(h, w, y, ignore_index=0, chunk_size=2)
    ref = torch.log_softmax(h @ w.t(), -1).gather(1, y[:, None]).squeeze(1) * (y != 0)
    torch.testing.assert_close(out, ref.detach())


def test_fused_frozen_weight():
    """weight.requires_grad=False (frozen head): only hidden gets a gradient, equal to plain."""
    for keep in (0, 10 * ROW64):
        _compare(37, 12, 50, 8, torch.float64, dict(rtol=1e-10, atol=1e-10), ignore=[3], weight_grad=False,
                 keep_bytes=keep)


def test_fused_bf16_inputs_compute_in_fp32():
    """bf16 hidden/weight: logits are computed in fp32, so the result equals the fp32 plain computation
    on the same (bf16-rounded) values; output is fp32, grads come back in bf16."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(40, 32, generator=g).bfloat16().requires_grad_()
    w = torch.randn(300, 32, generator=g).bfloat16().requires_grad_()
    y = torch.randint(0, 300, (40,), generator=g)
    out = fused_token_logps(h, w, y, chunk_size=16, keep_bytes=10 * 300 * 4)
    out.sum().backward()
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = _plain(h32, w32, y)
    ref.sum().backward()
    assert out.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h.grad.float(), h32.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(w.grad.float(), w32.grad, rtol=1e-2, atol=1e-2)


def test_fused_gradcheck():
    """Finite differences agree with the analytic backward (float64, ignored row, uneven chunks)."""
    h = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 4, -100, 2, 2, 1, 3])
    for keep in (0, 3 * 5 * 8):
        def logps(a, b, keep=keep):
            return fused_token_logps(a, b, y, chunk_size=3, keep_bytes=keep)
        assert torch.autograd.gradcheck(logps, (h, w))


def test_fused_feeds_mpo_loss_end_to_end():
    """Sequence log-probs from the fused path give the same MPO loss and lm-head grad as plain."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(4 * 6, 16, dtype=torch.float64, generator=g)
    w = torch.randn(40, 16, dtype=torch.float64, generator=g)
    y = torch.randint(0, 40, (24,), generator=g)
    y[[0, 1, 6, 12, 13, 18]] = -100                          # prompt tokens
    grads = []
    for fn in (lambda a, b: fused_token_logps(a, b, y, chunk_size=5), lambda a, b: _plain(a, b, y)):
        ww = w.clone().requires_grad_()
        seq = fn(h, ww).view(4, 6).sum(1)                    # (4,) = chosen0, chosen1, rejected0, rejected1
        n_tok = (y != -100).view(4, 6).sum(1)
        loss, _ = mpo_loss(seq[:2], seq[2:], seq[:2].detach() - 1, seq[2:].detach(), -seq[:2] / n_tok[:2])
        loss.backward()
        grads.append((loss.detach(), ww.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    assert F.cosine_similarity(grads[0][1].flatten(), grads[1][1].flatten(), dim=0) > 0.999999


def test_fused_keeps_softmax_only_when_backward_will_come(monkeypatch):
    """keep_bytes = 3 float64 rows of V = 7 (3 * 56 bytes): 3 of 5 rows kept when grads are needed;
    none under torch.no_grad or for inputs without requires_grad (e.g. the reference model)."""
    import mpo_online.trainer.losses as L
    seen, orig = [], L._chunks
    monkeypatch.setattr(L, "_chunks", lambda n, k, c: seen.append(k) or orig(n, k, c))
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (5,))
    out = fused_token_logps(h, w, y, keep_bytes=3 * 7 * 8)
    with torch.no_grad():
        out_ng = fused_token_logps(h, w, y, keep_bytes=3 * 7 * 8)
    fused_token_logps(h.detach(), w.detach(), y, keep_bytes=3 * 7 * 8)
    assert seen == [3, 0, 0]
    torch.testing.assert_close(out.detach(), out_ng)
