"""experiments/update_stats.py: per-objective means of what the loop recorded about its training calls (pure logic on
run directories written here; nothing is trained)."""

import json

import yaml


def _run(root, name, seed, cfg, trains):
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "rollout": {"seed": seed},
                                                     "model": {"path": "artifacts/smollm2-135m"}}))
    rounds = [{"round": 0, "policy_version": 0, "eval": {"accuracy_cot": 0.5, "n_qa": 100}, "seconds": {"total": 60},
               "train": {"objective": "sft", "grad_norm": 99.0, "steps": 16}}]   # the warm start: not a round's call
    rounds += [{"round": i, "policy_version": i, "eval": {"accuracy_cot": 0.5, "n_qa": 100}, "seconds": {"total": 60},
                "train": t} for i, t in enumerate(trains, start=1)]
    (run / "summary.json").write_text(json.dumps({"wall_seconds": 600, "rounds": rounds}))
    return run


def test_calls_are_pooled_per_objective_over_seeds_and_rounds(tmp_path, experiment):
    """Two seeds of MPO with an SFT call (sft.unpaired), two rounds each. The MPO call's grad norms 10, 14 (seed 0)
    and 12, 8 (seed 1): mean 11.0; margins 1, 2, 3, 2: 2.00; chosen +0.1 on seed 0 and -0.1 on seed 1: +0.00;
    rejected -0.9, -1.9, -3.1, -2.1: -2.00; steps 40, 20, 30, 30: 30. Seed 1's round 2 ran no SFT call (its
    chains were all paired), so the SFT call's figures are those of the other three rounds: grad norms 4, 5, 6: 5.0;
    steps 10, 20, 30: 20; it records no rewards. The warm start's call (round 0) is left out."""
    def mpo(g, m, c, r, steps):
        return {"objective": "mpo", "grad_norm": g, "reward_margin": m, "reward_chosen": c, "reward_rejected": r,
                "steps": steps}

    def both(pref, sft_norm, sft_steps):
        return {**pref, "calls": {"mpo": pref, "rft": {"objective": "rft", "grad_norm": sft_norm, "steps": sft_steps}}}

    cfg = {"mpo": {"objective": "mpo"}, "sft": {"unpaired": True}}
    runs = [_run(tmp_path, "a", 0, cfg, [both(mpo(10, 1, 0.1, -0.9, 40), 4, 10),
                                         both(mpo(14, 2, 0.1, -1.9, 20), 5, 20)]),
            _run(tmp_path, "b", 1, cfg, [both(mpo(12, 3, -0.1, -3.1, 30), 6, 30),
                                         mpo(8, 2, -0.1, -2.1, 30)])]
    mod = experiment("update_stats")
    rows = [json.loads((r / "summary.json").read_text()) for r in runs]
    (pref_name, pref), (sft_name, sft) = mod.call_stats(rows)
    assert (pref_name, sft_name) == ("mpo", "rft")
    assert pref["grad_norm"] == 11.0 and pref["reward_margin"] == 2.0 and pref["steps"] == 30
    assert abs(pref["reward_chosen"]) < 1e-12 and abs(pref["reward_rejected"] + 2.0) < 1e-12
    assert sft == {"grad_norm": 5.0, "steps": 20.0}

    md = mod.table(runs)
    assert "| mpo | 2 | mpo | 30 | 11.0 | +0.00 | -2.00 | 2.00 |\n|  |  | rft | 20 | 5.0 | - | - | - |\n" in md
