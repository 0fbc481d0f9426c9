"""experiments/heldout_reeval.py's pure parts: the extended held-out set, the scores and the table (the evaluation
itself is mpo_online.evaluate's, on the engine the loop uses)."""

import json

import yaml

from mpo_online.synthetic.word_problems import write_problem_splits


def test_the_extended_set_starts_with_the_held_out_split_and_repeats_no_question(tmp_path, experiment):
    import pyarrow.parquet as pq

    write_problem_splits(tmp_path, n_train=60, n_heldout=10, seed=3, levels=(1, 2))
    rows, n_orig = experiment("heldout_reeval").extended_heldout(tmp_path, 40)
    train = pq.read_table(tmp_path / "train.parquet").to_pylist()
    heldout = pq.read_table(tmp_path / "heldout.parquet").to_pylist()
    assert n_orig == 10 and len(rows) == 50
    assert [r["id"] for r in rows[:10]] == [r["id"] for r in heldout]
    questions = [r["question"] for r in rows]
    assert len(set(questions)) == 50 and not set(questions) & {r["question"] for r in train}
    assert {json.loads(r["meta"])["level"] for r in rows[10:]} == {1, 2}
    assert rows == experiment("heldout_reeval").extended_heldout(tmp_path, 40)[0]   # same task directory, same set


def test_scores_split_the_original_problems_from_the_new_ones(experiment):
    """Three original problems (golds 1, 2, 3) and two new ones (4, 5). CoT right on 1, 3 and 5, no answer line for 2
    (a format failure), 9 for 4 is wrong: all 3/5 = 0.6, original 2/3, new 1/2, format failures 1/5 = 0.2.
    Direct right only on 4: 1/5 = 0.2, original 0/3, new 1/2."""
    rows = [{"answer": str(g)} for g in range(1, 6)]
    cot = ["Final answer: 1", "I do not know.", "Final answer: 3", "Final answer: 9", "Final answer: 5"]
    direct = ["Final answer: 7", "Final answer: 7", "Final answer: 7", "Final answer: 4", "Final answer: 7"]
    s = experiment("heldout_reeval")._scores(rows, {"cot": cot, "direct": direct}, n_orig=3)
    assert (s["n"], s["n_original"]) == (5, 3)
    assert s["accuracy_cot"] == 0.6 and s["accuracy_cot_original"] == 2 / 3 and s["accuracy_cot_extra"] == 0.5
    assert s["format_failure_rate_cot"] == 0.2
    assert s["accuracy_direct"] == 0.2 and s["accuracy_direct_original"] == 0 and s["accuracy_direct_extra"] == 0.5


def _run(root, name, seed, accs, recorded):
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"mpo": {"objective": "rft"}, "rollout": {"seed": seed},
                                                     "model": {"path": "artifacts/smollm2-135m"}}))
    rounds = [{"round": i, "policy_version": i, "eval": {"accuracy_cot": r, "n_qa": 100}, "seconds": {"total": 60}}
              for i, r in enumerate(recorded)]
    (run / "summary.json").write_text(json.dumps({"wall_seconds": 600, "rounds": rounds}))
    versions = [{"version": i, "n": 500, "accuracy_cot": a, "accuracy_cot_original": r + (0.01 if i == 1 else 0),
                 "recorded_accuracy_cot": r, "format_failure_rate_cot": 0.02 * seed * (i == 2)}
                for i, (a, r) in enumerate(zip(accs, recorded))]
    (run / "heldout_reeval.json").write_text(json.dumps({"commit": "abc1234", "date": "2026-12-05",
                                                         "machine": "Test CPU, 2 cores, AVX2", "versions": versions}))
    return run


def test_the_table_groups_seeds_and_shows_how_far_the_loop_s_own_figures_are(tmp_path, experiment):
    """Seed 0: 50% -> 56% -> 60% of 500 (gain +10), seed 1: 40% -> 44% -> 46% (gain +6): means 45.0 ± 5.0, 50.0 ±
    6.0, 53.0 ± 7.0, gain 8.0 ± 2.0 (sample std of 10 and 6 is 2.83, / sqrt 2 = 2.0). Round 1's re-evaluation of the
    original problems is 1 point off what the loop recorded, on both seeds. Format failures of the last version 0%
    and 2%: 1.0 ± 1.0. Both runs' rounds took 60 s: 1.0 minutes per round."""
    runs = [_run(tmp_path, "a", 0, [0.5, 0.56, 0.6], [0.5, 0.5, 0.6]),
            _run(tmp_path, "b", 1, [0.4, 0.44, 0.46], [0.4, 0.4, 0.5])]
    md = experiment("heldout_reeval").table(runs)
    assert md.startswith("Held-out greedy CoT accuracy on 500 problems (the runs' 100 and 400 new ones")
    assert ("| rft | a (0), b (1) | 45.0 ± 5.0 → 50.0 ± 6.0 → 53.0 ± 7.0 | +8.0 ± 2.0 | +10.0, +6.0 | 1.0 ± 1.0 | "
            "1.0, 1.0 | 1 pts |" in md)
    assert "re-evaluated at `abc1234`, 2026-12-05, Test CPU, 2 cores, AVX2." in md
