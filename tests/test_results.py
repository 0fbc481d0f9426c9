"""Results tables render themselves from run directories (mpo_online/run/results.py): a fixture run with two rounds."""

import json

import pytest
import yaml

from mpo_online.run.results import plot, render, render_into, run_row

MACHINE = {"cpu_model": "Test CPU", "cores": 2, "vector": "AVX2", "arch": "x86_64"}


def _fixture_run(root, name="mpo_run", sessions=True, mpo=None, seed=0, last_cot=0.155):
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"mpo": mpo or {"objective": "mpo"}, "rollout": {"seed": seed},
                                                     "model": {"path": "artifacts/smollm2-135m"}}))
    rounds = [{"round": 0, "policy_version": 0, "eval": {"accuracy_cot": 0.01, "accuracy_direct": 0.01,
                                                         "format_failure_rate": 0.77, "n_qa": 100}, "seconds": {}},
              {"round": 1, "policy_version": 1, "pairs": {"pairs": {"correctness": 8}},
               "eval": {"accuracy_cot": 0.07, "accuracy_direct": 0.06, "format_failure_rate": 0.59, "n_qa": 100},
               "seconds": {"total": 607.3}},
              {"round": 2, "policy_version": 2, "pairs": {"pairs": {"correctness": 20, "dropout_ntp": 4}},
               "eval": {"accuracy_cot": last_cot, "accuracy_direct": 0.1, "format_failure_rate": 0.3, "n_qa": 100},
               "seconds": {"total": 540.0}}]
    (run / "summary.json").write_text(json.dumps({"config_hash": "h", "wall_seconds": 1200, "rounds": rounds,
                                                  **({"machines": [MACHINE]} if sessions else {})}))
    if sessions:
        (run / "sessions.jsonl").write_text(json.dumps(
            {"started": "2026-12-02T20:34:00+00:00", "argv": ["python", "jobs/online_mpo.py", "--config", "x.yaml"],
             "commit": "abc1234", "dirty": True, "machine": MACHINE}) + "\n")
    return run


def test_a_run_row_carries_every_figure_and_where_it_came_from(tmp_path):
    row = run_row(_fixture_run(tmp_path))
    assert row["cot"] == "1.0 → 7.0 → 15.5" and row["gain"] == "+14.5"
    assert (row["direct"], row["format_fail"], row["n_heldout"]) == ("10.0", "30.0", "100")
    assert row["pairs"] == "8, 24" and row["minutes"] == "10.1, 9.0" and row["wall"] == "20.0"
    assert row["objective"] == "mpo" and row["model"] == "smollm2-135m"
    assert row["commit"] == "abc1234+dirty" and row["date"] == "2026-12-02"
    assert row["machine"] == "Test CPU, 2 cores, AVX2"
    assert row["command"] == "`python jobs/online_mpo.py --config x.yaml`"


def test_render_makes_both_tables_and_says_what_was_not_recorded(tmp_path):
    old = _fixture_run(tmp_path, "old_run", sessions=False)
    md = render([_fixture_run(tmp_path), old], title="Fixture")
    assert md.startswith("# Fixture\n") and f"`python -m mpo_online.run.results {tmp_path / 'mpo_run'} {old}`" in md
    assert ("| mpo_run | mpo | smollm2-135m | 1.0 → 7.0 → 15.5 | +14.5 | 10.0 | 30.0 | 100 | 8, 24 | 10.1, 9.0 | 20.0 |"
            in md)
    assert "| old_run | not recorded | not recorded | not recorded | not recorded |" in md


def test_a_forked_run_lists_the_fork_then_the_recipe(tmp_path):
    run = _fixture_run(tmp_path)
    fork = {"started": "2026-12-02T21:00:00+00:00", "argv": ["python", "experiments/fork_round.py", "--from", "a"],
            "commit": "abc1234", "dirty": False, "machine": MACHINE, "note": "round 1's rollouts from a"}
    lines = (run / "sessions.jsonl").read_text()
    (run / "sessions.jsonl").write_text(json.dumps(fork) + "\n" + lines)
    assert run_row(run)["command"] == ("`python experiments/fork_round.py --from a` (round 1's rollouts from a) then "
                                       "`python jobs/online_mpo.py --config x.yaml`")


def test_seeds_of_one_objective_are_grouped_with_a_standard_error(tmp_path):
    """Two MPO seeds end at 15.5% and 21.5% from 1.0%: per-round means 1.0, 7.0, 18.5; the gains 14.5 and 20.5 have
    mean 17.5, sample std sqrt(((-3)^2 + 3^2) / 1) = 4.243, standard error 4.243 / sqrt(2) = 3.0. The control (loss
    weights 0/0/1) is its own group of one seed, without a ±."""
    runs = [_fixture_run(tmp_path, "s0"), _fixture_run(tmp_path, "s1", seed=1, last_cot=0.215),
            _fixture_run(tmp_path, "sft", mpo={"objective": "mpo", "w_pref": 0.0, "w_quality": 0.0})]
    md = render(runs)
    assert ("| mpo | smollm2-135m | s0 (0), s1 (1) | 1.0 ± 0.0 → 7.0 ± 0.0 → 18.5 ± 3.0 | +17.5 ± 3.0 | 30.0 ± 0.0 | "
            "10.1, 9.0 |" in md)
    assert ("| sft-only control (mpo, weights 0/0/1) | smollm2-135m | sft (0) | 1.0 → 7.0 → 15.5 | +14.5 | 30.0 | "
            "10.1, 9.0 |" in md)
    assert run_row(runs[2])["objective"] == "sft-only control (mpo, weights 0/0/1)"


def test_two_groups_of_one_objective_name_their_additions(tmp_path):
    """The paper's MPO and MPO with first-token rewards and an SFT call would both read "mpo": the table names what
    the second adds; alone in a table, such a group keeps its plain label."""
    plus = ({"objective": "mpo", "pref_span": "first_diff_token"}, {"unpaired": True, "paired": True})
    runs = [_fixture_run(tmp_path, "paper"), _fixture_run(tmp_path, "plus", mpo=plus[0])]
    (runs[1] / "config.yaml").write_text(yaml.safe_dump({"mpo": plus[0], "sft": plus[1], "rollout": {"seed": 0},
                                                         "model": {"path": "artifacts/smollm2-135m"}}))
    md = render(runs)
    assert "| mpo | smollm2-135m | paper (0) |" in md
    assert ("| mpo + rewards on the first diff token, SFT call on every checked chain | smollm2-135m | plus (0) |"
            in md)
    assert "| mpo | smollm2-135m | plus (0) |" in render(runs[1:])


def test_a_setting_the_objective_ignores_does_not_split_a_group(tmp_path):
    """`sft.mixed_repeats` changes RFT runs only: MPO seeds that differ in it are one group, RFT seeds are not."""
    from mpo_online.run.results import _group_key
    mpo = [{"mpo": {"objective": "mpo"}, "sft": {"mixed_repeats": k}, "rollout": {"seed": k}} for k in (1, 2)]
    rft = [{"mpo": {"objective": "rft"}, "sft": {"mixed_repeats": k}, "rollout": {"seed": k}} for k in (1, 2)]
    assert _group_key(mpo[0]) == _group_key(mpo[1]) and _group_key(rft[0]) != _group_key(rft[1])


def test_render_into_replaces_only_the_text_between_the_markers(tmp_path):
    runs = [_fixture_run(tmp_path, "s0"), _fixture_run(tmp_path, "s1", seed=1, last_cot=0.215)]
    readme = "# Title\nbefore\n<!-- results:begin -->\nold table\n<!-- results:end -->\nafter\n"
    out = render_into(readme, runs)
    assert out.startswith("# Title\nbefore\n<!-- results:begin -->\n") and out.endswith("<!-- results:end -->\nafter\n")
    assert "old table" not in out and "| s0 (0), s1 (1) | 1.0 ± 0.0 → 7.0 ± 0.0 → 18.5 ± 3.0 | +17.5 ± 3.0 |" in out
    assert "`abc1234+dirty`; 2026-12-02; Test CPU, 2 cores, AVX2." in out
    assert render_into(out, runs) == out  # rendering again changes nothing
    with pytest.raises(ValueError, match="results:begin"):
        render_into("no markers", runs)
    # A named block has its own markers; the default block around it is left alone.
    both = out + "<!-- results:demo:begin -->\nx\n<!-- results:demo:end -->\n"
    demo = render_into(both, runs[:1], block="demo")
    assert demo.startswith(out) and "--block demo " in demo and "| s0 (0) |" in demo and "\nx\n" not in demo


def test_plot_draws_one_line_per_group(tmp_path):
    """Two seeds of one config and a control: a PNG with two lines (the groups), each point a mean over its seeds."""
    import matplotlib.image

    runs = [_fixture_run(tmp_path, "s0"), _fixture_run(tmp_path, "s1", seed=1, last_cot=0.215),
            _fixture_run(tmp_path, "sft", mpo={"objective": "mpo", "w_pref": 0.0, "w_quality": 0.0})]
    plot(runs, tmp_path / "a.png")
    img = matplotlib.image.imread(tmp_path / "a.png")
    assert img.shape[:2] == (400, 700)  # 7 x 4 inches at 100 dpi
    assert (img[..., :3].std(axis=2) > 0.1).sum() > 500  # coloured pixels: the lines, not only the black axes
