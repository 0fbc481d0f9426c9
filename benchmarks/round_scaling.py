"""How one round's time splits as prompts per round grow: what grows with the data and what is fixed.

    python benchmarks/round_scaling.py --warm-start-from runs/tiny_cpu [--sizes 128 512 2048] [--out runs/scaling]
    python benchmarks/round_scaling.py --report-only --out runs/scaling

For each size, one round of the recipe (jobs/online_mpo.py, the demo's config) in its own run directory, all from
the same warm-start policy (copied from --warm-start-from's policies/v0000): rollouts + pairs, the update, the swap,
the held-out evaluation. Printed per size: seconds of each phase, split into the part that does the work (engine
generating, optimizer steps) and the rest, and the per-prompt cost of the data-dependent parts. The evaluation
(500 held-out prompts) and the swap do not depend on the round's size.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def split(manifest: dict) -> dict:
    sec, stats = manifest["seconds"], manifest["stats"]
    train = stats.get("train", {})
    gen = stats["pairs"].get("engine_busy_fraction", 0.0) * sec.get("rollout", 0.0)
    return {"prompts": stats["pairs"].get("prompts", 0), "pairs": sum((stats["pairs"].get("pairs") or {}).values()),
            "rollout_s": sec.get("rollout", 0.0), "generating_s": gen, "train_s": sec.get("train", 0.0),
            "steps_s": train.get("train_seconds", 0.0), "ref_s": train.get("ref_seconds", 0.0),
            "swap_s": sec.get("swap", 0.0), "eval_s": sec.get("eval", 0.0)}


def table(rows: list[dict]) -> str:
    out = ["| prompts | pairs | rollout s (generating) | train call s (optimizer steps, ref pass) | swap s | eval s | "
           "round s | rollout + train s per prompt |", "|" + "---:|" * 8]
    for r in rows:
        total = r["rollout_s"] + r["train_s"] + r["swap_s"] + r["eval_s"]
        per = (r["rollout_s"] + r["train_s"]) / max(r["prompts"], 1)
        out.append(f"| {r['prompts']} | {r['pairs']} | {r['rollout_s']:.1f} ({r['generating_s']:.1f}) | "
                   f"{r['train_s']:.1f} ({r['steps_s']:.1f}, {r['ref_s']:.1f}) | {r['swap_s']:.1f} | "
                   f"{r['eval_s']:.1f} | {total:.1f} | {per:.3f} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--out", default="runs/scaling")
    p.add_argument("--config", default="jobs/configs/tiny_cpu.yaml")
    p.add_argument("--warm-start-from", default="runs/tiny_cpu", help="a run directory whose policies/v0000 to use")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    rows = []
    for n in a.sizes:
        run = Path(a.out) / f"prompts_{n}"
        if not a.report_only:
            if not (run / "policies/v0000").exists():
                (run / "policies").mkdir(parents=True, exist_ok=True)
                shutil.copytree(Path(a.warm_start_from) / "policies/v0000", run / "policies/v0000")
            cmd = [sys.executable, str(ROOT / "jobs/online_mpo.py"), "--config", a.config, f"loop.run_dir={run}",
                   "loop.rounds=1", f"rollout.prompts_per_round={n}", *a.overrides]
            print("running", " ".join(cmd[2:]), flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
        manifest = run / "rounds/round_0001/manifest.json"
        if manifest.exists():
            rows.append(split(json.loads(manifest.read_text())))
    if not rows:
        sys.exit(f"no finished round under {a.out}")
    print(table(rows))


if __name__ == "__main__":
    main()
