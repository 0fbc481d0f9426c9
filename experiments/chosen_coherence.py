"""Are the policy's *correct* samples correct for the right reason? A diagnostic for runs on the synthetic tasks.

    python experiments/chosen_coherence.py runs/tiny_cpu [--data artifacts/tasks]

The verifier only checks final answers. On the synthetic tasks a chain states what it read from the image (one scan
line per asked colour, mpo_online.synthetic.chains) and the task's metadata holds the grid, so for the correctness
pairs of every round this prints the share of chosen (correct) and rejected responses whose scan lines match the image
(`perceived`) and whose final answer follows from the lines (`consistent`). A low chosen `perceived` share means the
correct answers are mostly lucky: their pairs teach little about perception. (The loop records the same figures per
round in summary.json, under pairs.chains.)
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--data", default="artifacts/tasks", help="the task directory the run used (train.parquet)")
    a = p.parse_args()

    import pyarrow.parquet as pq

    from mpo_online.data.prompts import load_prompts
    from mpo_online.synthetic.chains import pair_chain_rates

    meta = {r["id"]: json.loads(r["meta"]) for r in load_prompts(Path(a.data) / "train.parquet")[0] if r.get("meta")}
    print(f"{'round':>5} {'pairs':>6} {'chosen perceived':>17} {'chosen consistent':>18} {'rejected perceived':>19} "
          f"{'rejected consistent':>20}")
    for path in sorted(Path(a.run_dir).glob("rounds/round_*/pairs.parquet")):
        r = pair_chain_rates(pq.read_table(path).to_pylist(), meta)
        if r:
            print(f"{path.parent.name[-4:]:>5} {r['pairs_checked']:>6} {100 * r['chosen_perceived']:>16.1f}% "
                  f"{100 * r['chosen_consistent']:>17.1f}% {100 * r['rejected_perceived']:>18.1f}% "
                  f"{100 * r['rejected_consistent']:>19.1f}%")


if __name__ == "__main__":
    main()
