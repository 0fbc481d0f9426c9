"""experiments/pair_shift.py's arithmetic (pure logic; the scoring itself is mpo_online.trainer.parity's, tested
there)."""

import math


def test_report_splits_the_chosen_tokens_around_the_decision_token(experiment):
    """Pair 1: chosen ids [8, 7, 9], rejected [8, 8, 9]: they first differ at position 1 (7 vs 8), so position 1 is
    the decision token, position 0 holds the rejected decision token's id (8) and position 2 is the rest.
    Starting policy, chosen log-probs [-0.2, -1.0, -0.3]; after: chosen [-0.1, -0.5, -0.6], rejected [-0.1, -2.0, -0.4].
    decision: chosen -0.5, rejected -2.0, p(other) = 1 - e^-0.5 - e^-2 = 1 - 0.60653 - 0.13534 = 0.25813, chosen the
    likelier (1.0); chosen sequence -0.1 - 0.5 - 0.6 = -1.2; changes: decision -0.5 + 1.0 = +0.5, same id
    -0.1 + 0.2 = +0.1, rest -0.6 + 0.3 = -0.3. Pair 2: chosen [1, 2] is a prefix of rejected [1, 2, 3]: no decision
    token, left out (pairs = 1)."""
    ps = experiment("pair_shift")
    rows = [{"chosen_token_ids": [8, 7, 9], "rejected_token_ids": [8, 8, 9]},
            {"chosen_token_ids": [1, 2], "rejected_token_ids": [1, 2, 3]}]
    base = [([-0.2, -1.0, -0.3], [-0.2, -0.9, -0.3]), ([-0.1, -0.1], [-0.1, -0.1, -0.1])]
    after = [([-0.1, -0.5, -0.6], [-0.1, -2.0, -0.4]), ([-0.1, -0.1], [-0.1, -0.1, -0.1])]
    rep = ps.report(rows, base, after)
    expected = {"pairs": 1, "decision_logp_chosen": -0.5, "decision_logp_rejected": -2.0,
                "decision_p_other": 0.25813, "decision_chosen_likelier": 1.0, "chosen_seq_logp": -1.2,
                "chosen_dlogp_at_decision": 0.5, "chosen_dlogp_same_id_as_rejected": 0.1, "chosen_dlogp_rest": -0.3}
    assert rep.keys() == expected.keys()
    for k, v in expected.items():
        assert math.isclose(rep[k], v, abs_tol=1e-5), (k, rep[k], v)
