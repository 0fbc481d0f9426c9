"""The paper's Tables 6-7 in miniature: MPO vs DPO vs DPO+SFT vs RFT from the same warm start, over several seeds.

    python experiments/ablation.py [--rounds 5] [--seeds 0 1 2] [--out runs/ablation] [key=value ...]
    python experiments/ablation.py --report-only --out runs/ablation --seeds 0 1 2
    python experiments/ablation.py --warm-start-from runs/tiny_cpu [...]    # every seed from that run's warm start
    python experiments/ablation.py --objectives mpo rft [...]               # a subset of the objectives

For each seed s, the objectives (all four, or those given with --objectives) run the real loop (jobs/online_mpo.py)
one after another in run directories `<out>/seed<s>/<objective>` (one Ray cluster at a time). They share the model,
the tasks and the warm-start policy v0 of seed s (trained by the first objective's run, copied into the others), and
every seed of the run: `model.seed`, `trainer.seed` and `rollout.seed` are all s. So within a seed the objectives
differ only in the loss; across seeds, everything random differs (initial weights, warm-start data order, sampled
rollouts). With --warm-start-from, all runs start from that run's warm start (no warm start is trained) and seeds
vary the rollouts and the updates only.

Prints and writes `<out>/ablation.md`: per objective, held-out greedy CoT accuracy on the final round (mean over
seeds ± the standard error of that mean, and each seed's value), the round-by-round means, direct-answer accuracy,
format failures and chain consistency on the final round, and the mean sampling accuracy of the rollouts.
"""

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OBJECTIVES = ("mpo", "dpo_sft", "dpo", "rft")


def run_seed(out: Path, seed: int, a) -> dict:
    results = {}
    first = out / f"seed{seed}" / a.objectives[0]
    shared = Path(a.warm_start_from) / "policies/v0000" if a.warm_start_from else first / "policies/v0000"
    # this seed's initial weights (built on first use), unless every seed starts from one given warm start
    model = [] if a.warm_start_from else [f"model.seed={seed}", f"model.path={out / f'seed{seed}' / 'model'}"]
    for objective in a.objectives:
        run = out / f"seed{seed}" / objective
        if run / "policies/v0000" != shared and not (run / "policies/v0000").exists() and shared.exists():
            (run / "policies").mkdir(parents=True, exist_ok=True)  # the same warm start for every objective
            shutil.copytree(shared, run / "policies/v0000")
        if not a.report_only:
            cmd = [sys.executable, str(ROOT / "jobs/online_mpo.py"), "--config", a.config, f"loop.run_dir={run}",
                   f"loop.rounds={a.rounds}", f"mpo.objective={objective}", *model,
                   f"trainer.seed={seed}", f"rollout.seed={seed}", *a.overrides]
            print("running", " ".join(cmd[2:]), flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
        summary = run / "summary.json"
        if summary.exists():
            results[objective] = json.loads(summary.read_text())["rounds"]
    return results


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def report(by_seed: dict[int, dict]) -> str:
    seeds = sorted(by_seed)
    any_rounds = next(r for s in seeds for r in by_seed[s].values())
    n_qa = any_rounds[0]["eval"]["n_qa"]
    lines = [f"Held-out greedy accuracy (%) on {n_qa} prompts; seeds {seeds}; final = last round; mean ± standard "
             f"error over seeds (one run's own standard error is ~{100 * (0.25 / n_qa) ** 0.5:.1f} points at 50%).",
             "", "| objective | CoT final (mean ± se) | CoT final per seed | CoT per round (mean) | direct final | "
             "format fail final | chain consistent final | sample acc (mean) |", "|---|---|---|---|---|---|---|---|"]
    for objective in OBJECTIVES:
        runs = [by_seed[s][objective] for s in seeds if objective in by_seed[s]]
        if not runs:
            continue
        k = min(len(r) for r in runs)  # rounds every seed has finished

        def final(key, runs=runs, k=k):
            return [100 * r[k - 1]["eval"].get(key, float("nan")) for r in runs]
        m, se = mean_se(final("accuracy_cot"))
        curve = " / ".join(f"{sum(100 * r[i]['eval']['accuracy_cot'] for r in runs) / len(runs):.1f}"
                           for i in range(k))
        samples = [r[i]["pairs"]["sample_accuracy"] for r in runs for i in range(1, k)
                   if r[i]["pairs"].get("sample_accuracy") is not None]
        lines.append(
            f"| {objective} | {m:.1f} ± {se:.1f} | {' / '.join(f'{x:.1f}' for x in final('accuracy_cot'))} | "
            f"{curve} | {mean_se(final('accuracy_direct'))[0]:.1f} | {mean_se(final('format_failure_rate'))[0]:.1f} | "
            f"{mean_se(final('chain_consistent'))[0]:.1f} | "
            f"{100 * sum(samples) / len(samples) if samples else float('nan'):.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--config", default="jobs/configs/tiny_cpu.yaml")
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES,
                   help="which objectives to run (the first one trains each seed's warm start)")
    p.add_argument("--report-only", action="store_true", help="only tabulate the run directories under --out")
    p.add_argument("--warm-start-from", default=None,
                   help="a run directory whose warm start (policies/v0000) every seed and objective starts from; "
                        "seeds then vary the rollouts and the updates only")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    by_seed = {s: run_seed(out, s, a) for s in a.seeds}
    table = report(by_seed)
    (out / "ablation.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
