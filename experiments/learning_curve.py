"""Does the loop improve the policy? Held-out accuracy per round of a real run, with one standard error.

    python experiments/learning_curve.py [--config jobs/configs/learning_curve.yaml] [--run-dir runs/learning_curve]
                                        [--rounds N] [key=value ...]
    python experiments/learning_curve.py --report-only --run-dir runs/tiny_cpu     # table of an existing run

Runs the recipe (jobs/online_mpo.py, the same code `bash scripts/demo.sh` runs) in its own run directory — resuming
it if it exists — with jobs/configs/learning_curve.yaml by default (the demo's embedded default with a warm start
past the perception transition and 2,048-prompt rounds: ~33 min on 2 cores; `--rounds` overrides the config's 5),
then prints, per round: greedy CoT and direct accuracy on the held-out
split (± one standard error, sqrt(p(1-p)/n)), how often the CoT responses are worked chains (`chain_scanned`: scan
lines rather than a glance), hold together (`chain_consistent`: the final
answer follows from the stated tallies) and read the image right (`chain_perceived`), the sampling accuracy and
pass@k of the round's own rollouts (fresh training prompts, temperature as configured), pairs and how often their
chosen / rejected responses are worked chains, optimizer steps and
seconds; and the gain of the last round over the warm start in standard errors of the difference.
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def table(rounds: list[dict]) -> str:
    head = ("| round | CoT acc % | direct % | chain scanned % | chain consistent % | chain perceived % | "
            "sample acc % | pass@k % | pairs | chosen / rejected scanned % | steps | seconds |")
    lines = [head, "|" + "|".join(["---:"] * 12) + "|"]
    for r in rounds:
        ev, pairs, train = r["eval"], r.get("pairs") or {}, r.get("train") or {}
        chains = pairs.get("chains") or {}
        n = ev.get("n_qa", 0)

        def pct(x):
            return "-" if x is None else f"{100 * x:.1f}"
        lines.append(
            f"| {r['round']} | {pct(ev['accuracy_cot'])} ± {100 * se(ev['accuracy_cot'], n):.1f} | "
            f"{pct(ev.get('accuracy_direct'))} | {pct(ev.get('chain_scanned'))} | {pct(ev.get('chain_consistent'))} | "
            f"{pct(ev.get('chain_perceived'))} | {pct(pairs.get('sample_accuracy'))} | {pct(pairs.get('pass_at_k'))} | "
            f"{sum((pairs.get('pairs') or {}).values()) if pairs else '-'} | "
            f"{pct(chains.get('chosen_scanned'))} / {pct(chains.get('rejected_scanned'))} | "
            f"{train.get('steps', '-')} | "
            f"{(r.get('seconds') or {}).get('total', 0):.0f} |")
    first, last = rounds[0]["eval"], rounds[-1]["eval"]
    n = first.get("n_qa", 1)
    gain = last["accuracy_cot"] - first["accuracy_cot"]
    sd = math.hypot(se(first["accuracy_cot"], n), se(last["accuracy_cot"], n))
    lines += ["", f"CoT accuracy: {100 * first['accuracy_cot']:.1f}% (warm start) -> {100 * last['accuracy_cot']:.1f}% "
                  f"after round {rounds[-1]['round']}: {100 * gain:+.1f} points ({gain / sd:+.1f} standard errors of "
                  f"the difference, n = {n} held-out prompts)."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="jobs/configs/learning_curve.yaml")
    p.add_argument("--run-dir", default="runs/learning_curve")
    p.add_argument("--rounds", type=int, default=None, help="default: the config's loop.rounds")
    p.add_argument("--report-only", action="store_true", help="print the table of an existing run directory")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    run = Path(a.run_dir)
    if not a.report_only:
        rounds = [] if a.rounds is None else [f"loop.rounds={a.rounds}"]
        cmd = [sys.executable, str(ROOT / "jobs/online_mpo.py"), "--config", a.config, f"loop.run_dir={run}",
               *rounds, *a.overrides]
        print("running", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    summary = json.loads((run / "summary.json").read_text())
    out = table(summary["rounds"])
    (run / "learning_curve.md").write_text(out + "\n")
    print(out)


if __name__ == "__main__":
    main()
