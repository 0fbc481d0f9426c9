"""The paper's Tables 6-7 in miniature: MPO vs DPO vs DPO+SFT vs RFT from the same warm start, same prompts/seeds.

    python benchmarks/ablation.py [--rounds 3] [--out runs/ablation] [--warm-start-from runs/tiny_cpu] [key=value ...]

Each objective runs the real loop (jobs/online_mpo.py) in its own run directory, one after another (one Ray cluster
at a time), sharing the model, the tasks and a copy of the same warm-start policy v0 (the first objective's, or the
v0 of `--warm-start-from`, e.g. the demo's run directory). Prints and writes `<out>/ablation.md`: held-out greedy CoT
and direct accuracy and format failures per round, and the mean sample accuracy of the rollouts.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OBJECTIVES = ("mpo", "dpo", "dpo_sft", "rft")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--config", default="jobs/configs/tiny_cpu.yaml")
    p.add_argument("--warm-start-from", default=None, help="a run directory whose policies/v0000 all objectives use")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for objective in OBJECTIVES:
        run = out / objective
        first = Path(a.warm_start_from) if a.warm_start_from else out / OBJECTIVES[0]
        if run != first and not (run / "policies/v0000").exists():
            (run / "policies").mkdir(parents=True, exist_ok=True)  # same warm start: reuse v0 of the first run
            shutil.copytree(first / "policies/v0000", run / "policies/v0000")
        cmd = [sys.executable, str(ROOT / "jobs/online_mpo.py"), "--config", a.config, f"loop.run_dir={run}",
               f"loop.rounds={a.rounds}", f"mpo.objective={objective}", *a.overrides]
        print("running", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        summary = json.loads((run / "summary.json").read_text())
        results[objective] = summary["rounds"]

    def pct(rounds, key):
        return " / ".join(f"{100 * r['eval'][key]:.1f}" for r in rounds)

    n_qa = results[OBJECTIVES[0]][0]["eval"]["n_qa"]
    lines = [f"Held-out greedy accuracy % per round (round 0 = the shared warm start; {n_qa} prompts, one standard "
             f"error ~{100 * (0.25 / n_qa) ** 0.5:.1f} points at 50%).", "",
             "| objective | CoT acc % per round | direct acc % per round | format failures % (last) | "
             "sample acc % (mean) |", "|---|---|---|---|---|"]
    for objective, rounds in results.items():
        sample = [r["pairs"]["sample_accuracy"] for r in rounds[1:] if r["pairs"].get("sample_accuracy") is not None]
        mean_sample = f"{100 * sum(sample) / len(sample):.1f}" if sample else "-"
        lines.append(f"| {objective} | {pct(rounds, 'accuracy_cot')} | {pct(rounds, 'accuracy_direct')} | "
                     f"{100 * rounds[-1]['eval']['format_failure_rate']:.1f} | {mean_sample} |")
    table = "\n".join(lines)
    (out / "ablation.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
