"""The paper's Tables 6-7 in miniature: MPO vs DPO vs DPO+SFT vs RFT from the same warm start, same prompts/seeds.

    python benchmarks/ablation.py [--rounds 3] [--out runs/ablation] [key=value ...]

Each objective runs the real loop (jobs/online_mpo.py) in its own run directory, one after another (one Ray cluster
at a time), sharing the model, the tasks and a copy of the same warm-start policy v0. Prints and writes
`<out>/ablation.md`: held-out greedy CoT and direct accuracy and format failures after the last round.
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
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for objective in OBJECTIVES:
        run = out / objective
        first = out / OBJECTIVES[0]
        if objective != OBJECTIVES[0] and not (run / "policies/v0000").exists():
            (run / "policies").mkdir(parents=True, exist_ok=True)  # same warm start: reuse v0 of the first run
            shutil.copytree(first / "policies/v0000", run / "policies/v0000")
        cmd = [sys.executable, str(ROOT / "jobs/online_mpo.py"), "--config", a.config, f"loop.run_dir={run}",
               f"loop.rounds={a.rounds}", f"mpo.objective={objective}", *a.overrides]
        print("running", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        summary = json.loads((run / "summary.json").read_text())
        results[objective] = summary["rounds"]
    lines = ["| objective | CoT acc % (warm start -> last) | direct acc % | format failures % |",
             "|---|---|---|---|"]
    for objective, rounds in results.items():
        first, last = rounds[0]["eval"], rounds[-1]["eval"]
        lines.append(f"| {objective} | {100 * first['accuracy_cot']:.1f} -> {100 * last['accuracy_cot']:.1f} | "
                     f"{100 * first['accuracy_direct']:.1f} -> {100 * last['accuracy_direct']:.1f} | "
                     f"{100 * last['format_failure_rate']:.1f} |")
    table = "\n".join(lines)
    (out / "ablation.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
