"""How each objective's updates differ: gradient norms and implicit rewards of finished runs' training calls.

    python experiments/update_stats.py RUN [RUN ...]
    python experiments/update_stats.py --into docs/experiments.md --block NAME RUN [RUN ...]

Reads what the loop recorded (summary.json: each round's training metrics, per call when a round made two, e.g. a
preference call then an SFT call with `sft.unpaired`) and prints one row per group of seeds (grouped as
mpo_online/run/results.py groups runs), pooled over seeds and rounds 1..k: optimizer steps per round; the global
gradient norm before clipping (`trainer.max_grad_norm`), mean over steps; and for preference calls the implicit
rewards β·log(π/π_ref) of chosen and rejected responses and their margin, means over the call's steps. With AdamW and
clipping every objective moves the weights by about the learning rate per step whatever its gradient norm, so the norm
says how much of a step's direction the SFT term can set: in a combined loss its share is roughly its own norm (the
SFT-only control's) over the combined one. Nothing is run; no model is loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

TERMS = ("grad_norm", "reward_chosen", "reward_rejected", "reward_margin", "steps")


def round_calls(train: dict) -> list[tuple[str, dict]]:
    """[(objective, metrics)] of one round's training calls, in the order they ran (one call: its own metrics)."""
    if train.get("calls"):
        return list(train["calls"].items())
    return [(train.get("objective", "?"), train)] if train else []


def call_stats(runs: list[dict]) -> list[tuple[str, dict]]:
    """Per call objective of the runs' rounds 1.. (the preference call, then the SFT call "rft"; keyed by objective,
    so a round whose pair call was too small to run does not shift the others): (objective, {term: mean over the
    runs' rounds}) for the terms the calls recorded, in the order the calls first ran."""
    by_name: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for rnd in run["rounds"][1:]:
            for objective, m in round_calls(rnd.get("train") or {}):
                acc = by_name.setdefault(objective, {})
                for term in TERMS:
                    if isinstance(m.get(term), (int, float)):
                        acc.setdefault(term, []).append(float(m[term]))
    return [(name, {t: sum(v) / len(v) for t, v in acc.items()}) for name, acc in by_name.items()]


def _cell(stats: dict, term: str, fmt: str) -> str:
    return format(stats[term], fmt) if term in stats else "-"


def table(runs: list[Path], command: str = "") -> str:
    from mpo_online.run.results import group_cells, run_row

    rows = [run_row(run) for run in runs]
    out = ["Training calls of the rounds after the start, means over seeds and rounds (a round's second call, the SFT "
           "call, on its own line): optimizer steps per round, gradient norm before clipping (mean over steps), and "
           "the implicit rewards β·log(π/π_ref) of chosen and rejected responses:", "",
           "| objective | runs | call | steps | grad norm | reward chosen | reward rejected | margin |",
           "|---|---:|---|---:|---:|---:|---:|---:|"]
    for c in group_cells(rows):
        for i, (name, st) in enumerate(call_stats(c["runs"])):
            out.append(f"| {c['objective'] if i == 0 else ''} | {len(c['runs']) if i == 0 else ''} | {name} | "
                       f"{_cell(st, 'steps', '.0f')} | {_cell(st, 'grad_norm', '.1f')} | "
                       f"{_cell(st, 'reward_chosen', '+.2f')} | {_cell(st, 'reward_rejected', '+.2f')} | "
                       f"{_cell(st, 'reward_margin', '.2f')} |")
    out += ["", f"Rendered by `python experiments/update_stats.py {command}{' '.join(str(r) for r in runs)}`."]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    from mpo_online.run.results import add_into_args, write_or_print

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    add_into_args(p)
    a = p.parse_args(argv)
    write_or_print(lambda options: table(a.runs, options), a.into, a.block)


if __name__ == "__main__":
    main()
