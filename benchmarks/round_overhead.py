"""Share of round time that is neither generating, training nor evaluating, measured from a real run's records.

    python benchmarks/round_overhead.py runs/tiny_cpu            # after `bash scripts/demo.sh`

Per round: generating = the union of intervals with rollout requests in flight (engine-busy fraction x rollout wall
time, recorded by the Ray Data round), training = the optimizer-step time the workers measured, evaluating = the
eval phase. Everything else (the training worker group's start-up, which the job's first update may wait for, the
reference pass over the pairs the engine's log-probs do not cover, data plumbing, model and optimizer set-up, export,
swap) is overhead. Target: overhead <= 10% of round time.
"""

import json
import sys
from pathlib import Path


def round_overhead(manifest: dict) -> dict:
    sec, stats = manifest["seconds"], manifest["stats"]
    rollout = sec.get("rollout", 0.0)
    generating = stats["pairs"].get("engine_busy_fraction", 0.0) * rollout
    training = stats["train"].get("train_seconds", 0.0)
    evaluating = sec.get("eval", 0.0)
    total = sum(sec.get(k, 0.0) for k in ("rollout", "train", "swap", "eval"))
    useful = generating + training + evaluating
    return {"round": manifest["round"], "total_s": total, "generating_s": generating, "training_s": training,
            "evaluating_s": evaluating, "overhead_s": total - useful,
            "overhead_share": (total - useful) / total if total else 0.0,
            "train_call_s": sec.get("train", 0.0), "swap_s": sec.get("swap", 0.0)}


def main(run_dir: str) -> None:
    rows = []
    for path in sorted(Path(run_dir, "rounds").glob("round_*/manifest.json")):
        m = json.loads(path.read_text())
        if m["phase"] == "done":
            rows.append(round_overhead(m))
    if not rows:
        sys.exit(f"no finished rounds under {run_dir}/rounds")
    print(f"{'round':>5} {'total s':>8} {'gen s':>7} {'train s':>8} {'eval s':>7} {'overhead s':>10} {'share':>6}")
    for r in rows:
        print(f"{r['round']:>5} {r['total_s']:8.1f} {r['generating_s']:7.1f} {r['training_s']:8.1f} "
              f"{r['evaluating_s']:7.1f} {r['overhead_s']:10.1f} {r['overhead_share']:6.1%}")
    total = sum(r["total_s"] for r in rows)
    over = sum(r["overhead_s"] for r in rows)
    print(f"overall overhead share: {over / total:.1%} (target <= 10%)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny_cpu")
