"""Compare objectives on the same data: fork a run after round r's rollouts, then train that round another way.

    python experiments/fork_round.py --from runs/smollm2_cpu --round 1 --out runs/smollm2_rft
    python jobs/online_mpo.py --config jobs/configs/smollm2_cpu.yaml loop.run_dir=runs/smollm2_rft \
        mpo.objective=rft loop.rounds=1 --force

The new run directory gets the source's policies v0..v(r-1) (hard links: no copy of the weights), its evaluations of
rounds 0..r-1 (summary.json), its finished rounds before r, and round r's rollouts and pairs with the round's manifest
set back to the "pairs" phase. The recipe then resumes there: it trains round r with the new config (objective,
learning rate, ...; --force because the config differs), swaps, evaluates and goes on. So both runs start round r from
the same policy and the same sampled rollouts, and differ only in what the override changes. Rollouts sampled with
Dropout-NTP off are the same whatever the objective (seeded requests), so an RFT fork equals an RFT run from scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path


def fork(src: Path, dst: Path, r: int) -> None:
    from mpo_online.data.records import RoundManifest

    if dst.exists():
        raise SystemExit(f"{dst} exists: choose another --out")
    (dst / "policies").mkdir(parents=True)
    (dst / "rounds").mkdir()
    for v in range(r):  # policies v0..v(r-1): hard links, the files are never rewritten in place
        shutil.copytree(src / "policies" / f"v{v:04d}", dst / "policies" / f"v{v:04d}", copy_function=os.link)
    for q in range(1, r):
        shutil.copytree(src / "rounds" / f"round_{q:04d}", dst / "rounds" / f"round_{q:04d}")
    rdir = dst / "rounds" / f"round_{r:04d}"
    rdir.mkdir()
    for name in ("rollouts.parquet", "pairs.parquet", "rejects.jsonl", "pairs_stats.json"):
        if (src / "rounds" / f"round_{r:04d}" / name).exists():
            shutil.copy2(src / "rounds" / f"round_{r:04d}" / name, rdir / name)
    m = RoundManifest.from_json((src / "rounds" / f"round_{r:04d}" / "manifest.json").read_text())
    m.phase, m.delta = "pairs", {}
    m.stats = {"pairs": m.stats["pairs"]}
    m.seconds = {"rollout": m.seconds.get("rollout", 0.0)}
    (rdir / "manifest.json").write_text(m.to_json())
    summary = json.loads((src / "summary.json").read_text())
    summary["rounds"] = [x for x in summary["rounds"] if x["round"] < r]
    (dst / "summary.json").write_text(json.dumps(summary, indent=1))
    shutil.copy2(src / "run.json", dst / "run.json")


def record_fork(src: Path, dst: Path, r: int, argv: list[str]) -> None:
    """The fork is the new run's first session (sessions.jsonl; results tables list it before the recipe's)."""
    from mpo_online.run.state import RunDir
    RunDir(dst).record_session(argv, note=f"policies v0-v{r - 1} and round {r}'s rollouts and pairs from {src}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="src", required=True)
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    fork(Path(a.src), Path(a.out), a.round)
    record_fork(Path(a.src), Path(a.out), a.round,
                ["python", "experiments/fork_round.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"forked {a.src} before round {a.round}'s update into {a.out}")


if __name__ == "__main__":
    main()
