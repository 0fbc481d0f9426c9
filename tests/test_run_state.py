"""Run directory bookkeeping and reports: config refusal, manifests, checksums, phases, report files."""

import json

import pytest

from mpo_online.config import load_config
from mpo_online.data.records import RoundManifest
from mpo_online.run.report import Reporter, render_markdown
from mpo_online.run.state import PHASES, RunDir, RunDirError, phase_at_least, sha256_file, write_json_atomic


def test_run_dir_refuses_a_different_config_unless_forced(tmp_path):
    cfg = load_config(None, [f"loop.run_dir={tmp_path}"])
    RunDir.open(tmp_path, cfg)
    RunDir.open(tmp_path, load_config(None, [f"loop.run_dir={tmp_path}", "loop.rounds=9"]))  # more rounds: same run
    other = load_config(None, [f"loop.run_dir={tmp_path}", "trainer.lr=0.5"])
    with pytest.raises(RunDirError, match="different config.*--force"):
        RunDir.open(tmp_path, other)
    RunDir.open(tmp_path, other, force=True)
    assert json.loads((tmp_path / "run.json").read_text())["config_hash"] == other.hash()


def test_manifest_round_trip_and_phase_order(tmp_path):
    run = RunDir.open(tmp_path, load_config(None))
    assert run.manifest(1) is None and not phase_at_least(None, "started")
    m = RoundManifest(round=1, phase="pairs", policy_version=0, seeds={"rollout": 1}, delta={"value": 0.5})
    run.save_manifest(m)
    back = run.manifest(1)
    assert back == m
    assert phase_at_least(back, "started") and phase_at_least(back, "pairs") and not phase_at_least(back, "trained")
    assert PHASES[-1] == "done"
    run.advance(back, "done", eval=1.5)
    assert run.manifest(1).phase == "done" and run.manifest(1).seconds == {"eval": 1.5}


def test_file_checksums_detect_changes(tmp_path):
    run = RunDir.open(tmp_path, load_config(None))
    f = run.round_dir(1) / "pairs.parquet"
    f.write_bytes(b"abc")
    m = RoundManifest(round=1, phase="pairs", policy_version=0)
    run.record_file(m, f)
    # sha256("abc") is the well-known ba7816bf... digest
    assert m.files == {"rounds/round_0001/pairs.parquet":
                       "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    assert run.verify_files(m) == []
    f.write_bytes(b"abd")
    assert run.verify_files(m) == ["rounds/round_0001/pairs.parquet"]


def test_policy_versions(tmp_path):
    run = RunDir.open(tmp_path, load_config(None))
    for v in (0, 2):
        d = run.policy_dir(v)
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"x")
    run.policy_dir(3).mkdir()  # an incomplete directory is not a policy
    assert run.has_policy(0) and run.has_policy(2) and not run.has_policy(1) and not run.has_policy(3)


def test_atomic_json_leaves_no_temp_files(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert sha256_file(tmp_path / "a.json")


def _entry(r, acc):
    return {"round": r, "policy_version": r, "eval": {"accuracy_cot": acc, "accuracy_direct": acc / 2,
                                                      "format_failure_rate": 0.1},
            "pairs": {"pairs": {"correctness": 10 * r, "dropout_ntp": r}},
            "train": {"loss": 0.5, "delta": {"mode": "cumulative", "value": 0.01 * r, "count": 4.0 * r}},
            "seconds": {"total": 12.0}}


def test_reporter_writes_summary_metrics_plot_and_markdown(tmp_path):
    rep = Reporter(tmp_path, "abc")
    rep.record_round(_entry(0, 0.30), 10.0)
    rep.record_round(_entry(1, 0.45), 20.0)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert summary["wall_seconds"] == 20.0 and summary["config_hash"] == "abc"
    assert summary["accuracy_cot_gain"] == pytest.approx(0.15)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["eval.accuracy_cot"] == 0.45
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "tb").glob("events.*"))
    md = (tmp_path / "report.md").read_text()
    assert "| 1 | v1 | 45.0 | 22.5 | 10.0 | 11 | 0.500 | 0.0100 | 12 |" in md and "+15.0 points" in md
    # a resumed reporter keeps earlier rounds and the wall time
    again = Reporter(tmp_path, "abc")
    assert sorted(again.rounds) == [0, 1] and again.wall_seconds_so_far() == 20.0


def test_render_markdown_handles_missing_fields():
    md = render_markdown({"config_hash": "h", "wall_seconds": 1.0,
                          "rounds": [{"round": 0, "policy_version": 0, "eval": {}, "seconds": {}}]})
    assert "| 0 | v0 | - | - | - | 0 | - | - | 0 |" in md and "on an unrecorded machine" in md


def test_summary_and_report_name_the_machine(tmp_path):
    """Wall times depend on the CPU's vector width (2-3x here): summary.json records the machine of each session
    and report.md names it."""
    from mpo_online.run.machine import describe_machine, machine_line
    r = Reporter(tmp_path, "abc")
    r.record_round({"round": 0, "policy_version": 0, "eval": {"accuracy_cot": 0.5}, "seconds": {"total": 1}}, 1.0)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["machines"] == [describe_machine()]
    assert describe_machine()["vector"] in ("AVX-512", "AVX2", "other") and describe_machine()["cores"] >= 1
    assert f"wall time 1 s on {machine_line()}" in (tmp_path / "report.md").read_text()
    # a resumed run on another machine keeps both, in order
    moved = {**describe_machine(), "cpu_model": "Other CPU", "vector": "AVX2"}
    summary["machines"] = [moved]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    Reporter(tmp_path, "abc").record_round({"round": 1, "policy_version": 1, "eval": {}, "seconds": {}}, 2.0)
    assert json.loads((tmp_path / "summary.json").read_text())["machines"] == [moved, describe_machine()]
    assert "Other CPU, " in (tmp_path / "report.md").read_text()
