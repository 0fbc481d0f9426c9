"""Run reporting: summary.json, metrics.jsonl, TensorBoard events, report.md, a PNG accuracy plot.

The recipe calls `Reporter.record_round(...)` once per finished round (round 0 = the warm-start policy); everything
is rebuilt from the recorded rounds, so a resumed run produces the same files as an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

from mpo_online.run.state import write_json_atomic


class Reporter:
    def __init__(self, run_root: str | Path, config_hash: str):
        self.root = Path(run_root)
        self.config_hash = config_hash
        self.rounds: dict[int, dict] = {}
        path = self.root / "summary.json"
        earlier = json.loads(path.read_text()) if path.exists() else {}  # a resumed run keeps what was recorded
        for entry in earlier.get("rounds", []):
            self.rounds[entry["round"]] = entry
        # the machine of each session of the run (a resumed run may have moved): wall times depend on it
        from mpo_online.run.machine import describe_machine
        self.machines = earlier.get("machines", [])
        if describe_machine() not in self.machines:
            self.machines.append(describe_machine())

    def wall_seconds_so_far(self) -> float:
        """Wall time recorded by earlier sessions of this run (a resumed run keeps counting from there)."""
        path = self.root / "summary.json"
        return json.loads(path.read_text()).get("wall_seconds", 0.0) if path.exists() else 0.0

    def record_round(self, entry: dict, wall_seconds: float) -> None:
        """entry: {round, policy_version, eval: {...}, pairs: {...}, train: {...}, seconds: {...}}."""
        self.rounds[entry["round"]] = entry
        self.write(wall_seconds)

    def write(self, wall_seconds: float) -> None:
        rounds = [self.rounds[k] for k in sorted(self.rounds)]
        summary = {"config_hash": self.config_hash, "wall_seconds": wall_seconds, "machines": self.machines,
                   "rounds": rounds}
        if rounds:
            first, last = rounds[0]["eval"], rounds[-1]["eval"]
            summary["accuracy_cot_gain"] = last.get("accuracy_cot", 0.0) - first.get("accuracy_cot", 0.0)
        write_json_atomic(self.root / "summary.json", summary)
        with open(self.root / "metrics.jsonl.tmp", "w") as f:
            for r in rounds:
                f.write(json.dumps(_flatten(r), sort_keys=True) + "\n")
        (self.root / "metrics.jsonl.tmp").replace(self.root / "metrics.jsonl")
        self._tensorboard(rounds)
        self._plot(rounds)
        (self.root / "report.md").write_text(render_markdown(summary))

    def _tensorboard(self, rounds: list[dict]) -> None:
        from torch.utils.tensorboard import SummaryWriter
        tb = self.root / "tb"
        for old in tb.glob("events.*"):  # rebuilt from all rounds: one consistent event file
            old.unlink()
        writer = SummaryWriter(str(tb))
        for r in rounds:
            for key, value in _flatten(r).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "round":
                    writer.add_scalar(key.replace(".", "/"), value, r["round"])
        writer.close()

    def _plot(self, rounds: list[dict]) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        xs = [r["round"] for r in rounds]
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
        for key, label in (("accuracy_cot", "CoT (greedy)"), ("accuracy_direct", "direct answer"),
                           ("format_failure_rate", "format failures")):
            ax.plot(xs, [100 * r["eval"].get(key, float("nan")) for r in rounds], marker="o", label=label)
        ax.set_xlabel("round (0 = warm start)")
        ax.set_ylabel("% of held-out prompts")
        ax.set_title("mpo-online: held-out accuracy per round")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.root / "accuracy.png")
        plt.close(fig)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif not isinstance(v, (list, tuple)):
            out[key] = v
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _delta(d) -> str:
    """BCO's δ after the round: the recipe records the moving average's whole state ({"value", "count", ...})."""
    value = d.get("value") if isinstance(d, dict) else d
    return "-" if value is None else f"{value:.4f}"


def render_markdown(summary: dict) -> str:
    from mpo_online.run.machine import machine_line
    lines = ["# mpo-online run report", "",
             f"config hash `{summary['config_hash']}`, wall time {summary['wall_seconds']:.0f} s on "
             f"{' then '.join(machine_line(m) for m in summary.get('machines') or []) or 'an unrecorded machine'}",
             "",
             "| round | policy | CoT acc % | direct acc % | format fail % | pairs | train loss | delta | seconds |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary["rounds"]:
        ev, pairs, train = r.get("eval", {}), r.get("pairs", {}), r.get("train", {})
        n_pairs = sum((pairs.get("pairs") or {}).values()) if pairs else 0
        loss = train.get("loss")
        lines.append(
            f"| {r['round']} | v{r['policy_version']} | {_pct(ev.get('accuracy_cot'))} | "
            f"{_pct(ev.get('accuracy_direct'))} | {_pct(ev.get('format_failure_rate'))} | {n_pairs} | "
            f"{'-' if loss is None else f'{loss:.3f}'} | {_delta(train.get('delta'))} | "
            f"{r.get('seconds', {}).get('total', 0):.0f} |")
    if "accuracy_cot_gain" in summary:
        lines += ["", f"CoT accuracy gain over the warm start: {100 * summary['accuracy_cot_gain']:+.1f} points."]
    lines += ["", "![accuracy per round](accuracy.png)", ""]
    return "\n".join(lines)
