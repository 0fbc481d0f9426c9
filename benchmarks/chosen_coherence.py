"""Are the policy's *correct* samples correct for the right reason? A diagnostic for runs on the synthetic tasks.

    python benchmarks/chosen_coherence.py runs/tiny_cpu [--data artifacts/tasks]

The verifier only checks final answers. On the synthetic tasks the reasoning states the counts it read from the image
("I see 2 red and 3 blue. ..."), and the task's metadata holds the true counts, so for every correctness pair of every
round this prints the share of chosen (correct) and of rejected responses whose stated counts are all right. A low
chosen share means the correct answers are mostly lucky guesses: their pairs teach little about perception.
"""

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STATED = re.compile(r"I see (\d+) (\w+)(?: and (\d+) (\w+))?")


def counts_right(text: str, true_counts: dict) -> bool:
    """True when the response states counts ("I see N colour [and M colour]") and every stated count is right."""
    m = STATED.search(text)
    if not m:
        return False
    stated = [(m.group(1), m.group(2))] + ([(m.group(3), m.group(4))] if m.group(3) else [])
    return all(colour in true_counts and int(n) == true_counts[colour] for n, colour in stated)


def response_text(messages: list) -> str:
    content = messages[-1]["content"]
    return content if isinstance(content, str) else "".join(part.get("text") or "" for part in content)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--data", default="artifacts/tasks", help="the task directory the run used (train.parquet)")
    a = p.parse_args()

    import pyarrow.parquet as pq

    from mpo_online.data import load_prompts

    meta = {r["id"]: json.loads(r["meta"]) for r in load_prompts(Path(a.data) / "train.parquet")[0] if r.get("meta")}
    print(f"{'round':>5} {'op':>6} {'pairs':>6} {'chosen counts right':>20} {'rejected counts right':>22}")
    for path in sorted(Path(a.run_dir).glob("rounds/round_*/pairs.parquet")):
        tally = defaultdict(lambda: [0, 0, 0])  # op -> [pairs, chosen right, rejected right]
        for pair in pq.read_table(path).to_pylist():
            m = meta.get(pair["prompt_id"])
            if pair["kind"] != "correctness" or m is None:
                continue
            t = tally[m["op"]]
            t[0] += 1
            t[1] += counts_right(response_text(pair["chosen"]), m["counts"])
            t[2] += counts_right(response_text(pair["rejected"]), m["counts"])
        for op, (n, c, r) in sorted(tally.items()):
            print(f"{path.parent.name[-4:]:>5} {op:>6} {n:>6} {100 * c / n:>19.1f}% {100 * r / n:>21.1f}%")


if __name__ == "__main__":
    main()
