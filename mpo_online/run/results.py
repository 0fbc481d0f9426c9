"""Render results tables from run directories, so that no figure in the docs is typed by hand.

    python -m mpo_online.run.results runs/smollm2_cpu runs/smollm2_rft > docs/results.md
    python -m mpo_online.run.results --title "SmolLM2-135M, word problems" RUN [RUN ...]
    python -m mpo_online.run.results --into README.md RUN [RUN ...]   # the over-seeds table between its markers
    python -m mpo_online.run.results --plot docs/results.png RUN [RUN ...]   # that table as a plot

Each run directory (written by jobs/online_mpo.py) gives one row: the objective and model from its config.yaml,
held-out greedy CoT accuracy per round and the gain over round 0 from summary.json, direct-answer accuracy and
format failures at the last round, pairs and wall time per round, and from sessions.jsonl the command, the commit
(marked "+dirty" when the tree had uncommitted changes), the date and the machine (CPU model, cores, AVX-512/AVX2: wall
times change 2-3x between machines of this kind); every session's command is listed, in order. Runs made before
sessions.jsonl existed say "not recorded"; a session line written afterwards carries a `note` saying so, which the
table shows.
A second table groups runs whose configs differ only in their seeds and run directory: held-out CoT
accuracy per round and the gain as mean ± standard error over the seeds (rounds that every run of the group reached).
Tested in tests/test_results.py on fixture runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import yaml


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _read_run(run: Path) -> dict:
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else {}
    summary = json.loads((run / "summary.json").read_text())
    sessions = [json.loads(line) for line in (run / "sessions.jsonl").read_text().splitlines() if line.strip()] \
        if (run / "sessions.jsonl").exists() else []
    return {"cfg": cfg, "rounds": summary.get("rounds", []), "sessions": sessions,
            "wall_seconds": summary.get("wall_seconds"),
            "machines": summary.get("machines") or [s["machine"] for s in sessions if s.get("machine")]}


PAPER_WEIGHTS = (0.8, 0.2, 1.0)


def objective_label(cfg: dict) -> str:
    """The objective as trained: `mpo` with other loss weights than the paper's says which (w_pref=w_quality=0 is
    the SFT-only control: the gen term on the same pairs' chosen responses)."""
    mpo = cfg.get("mpo", {})
    objective = mpo.get("objective", "?")
    if objective != "mpo":
        return objective
    w = tuple(float(mpo.get(k, d)) for k, d in zip(("w_pref", "w_quality", "w_gen"), PAPER_WEIGHTS))
    if w == PAPER_WEIGHTS:
        return "mpo"
    weights = "/".join(f"{x:g}" for x in w)
    return f"sft-only control (mpo, weights {weights})" if w[:2] == (0.0, 0.0) else f"mpo (weights {weights})"


def objective_additions(cfg: dict) -> str:
    """The project's additions to the objective that its label does not show: rewards on a span instead of the
    sequence (`mpo.pref_span`), an SFT call of its own on the round's checked chains (`sft.unpaired` / `sft.paired`).
    Named in a table only where two groups would otherwise share a label."""
    parts = []
    span = cfg.get("mpo", {}).get("pref_span", "sequence")
    if span != "sequence":
        parts.append(f"rewards on the {span.replace('_', ' ')}")
    sft = cfg.get("sft", {})
    if sft.get("unpaired"):
        parts.append("SFT call on " + ("every checked chain" if sft.get("paired") else "unpaired prompts' chains"))
    return ", ".join(parts)


def _mean_and_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)); the error of one value is 0."""
    m = sum(xs) / len(xs)
    return m, ((sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) ** 0.5 if len(xs) > 1 else 0.0)


def _mean_se(xs: list[float]) -> str:
    m, se = _mean_and_se(xs)
    return f"{100 * m:.1f}" if len(xs) < 2 else f"{100 * m:.1f} ± {100 * se:.1f}"


def _group_key(cfg: dict) -> str:
    """The config without what seeds a run, where it is written, how many rounds it was asked for and what its
    objective ignores (`sft.mixed_repeats` applies to RFT only). Fields added to the config since a run was made take
    their defaults (what the run had in effect); a config the current code refuses is compared as written."""
    from mpo_online.config import RunConfig

    try:
        cfg = RunConfig.model_validate(cfg).model_dump(mode="json")
    except ValueError:
        pass
    rest = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.items()}
    ignored = [("rollout", "seed"), ("trainer", "seed"), ("loop", "run_dir"), ("loop", "rounds")]
    if rest.get("mpo", {}).get("objective") != "rft":
        ignored.append(("sft", "mixed_repeats"))
    for section, key in ignored:
        rest.get(section, {}).pop(key, None)
    return json.dumps(rest, sort_keys=True, default=str)


def run_row(run: Path) -> dict:
    """The figures of one run directory, as a dict of display strings."""
    from mpo_online.run.machine import machine_line

    r = _read_run(run)
    rounds = r["rounds"]
    if not rounds:
        raise ValueError(f"{run}: summary.json records no round")
    cot = [x["eval"].get("accuracy_cot") for x in rounds]
    last = rounds[-1]["eval"]
    pairs = [sum((x.get("pairs") or {}).get("pairs", {}).values()) for x in rounds[1:]]
    minutes = [x.get("seconds", {}).get("total", 0) / 60 for x in rounds[1:]]
    s = r["sessions"][-1] if r["sessions"] else {}
    commit = (s.get("commit") or "not recorded") + ("+dirty" if s.get("dirty") else "")
    # every session's command in order (a forked run: the fork, then the recipe), each with its note if any
    commands = ["`" + " ".join(x.get("argv", [])) + "`" + (f" ({x['note']})" if x.get("note") else "")
                for x in r["sessions"] if x.get("argv")]
    machines = list(dict.fromkeys(machine_line(m) for m in r["machines"])) or ["not recorded"]
    return {"run": run.name, "objective": objective_label(r["cfg"]), "additions": objective_additions(r["cfg"]),
            "seed": r["cfg"].get("rollout", {}).get("seed", 0), "group": _group_key(r["cfg"]),
            "cot_values": cot, "minutes_values": minutes,
            "format_values": [x["eval"].get("format_failure_rate") for x in rounds],
            "model": Path(r["cfg"].get("model", {}).get("path", "?")).name,
            "cot": " → ".join(_pct(c) for c in cot),
            "gain": "-" if None in (cot[0], cot[-1]) else f"{100 * (cot[-1] - cot[0]):+.1f}",
            "direct": _pct(last.get("accuracy_direct")), "format_fail": _pct(last.get("format_failure_rate")),
            "n_heldout": str(last.get("n_qa", "-")), "pairs": ", ".join(str(p) for p in pairs) or "-",
            "minutes": ", ".join(f"{m:.1f}" for m in minutes) or "-",
            "wall": "-" if r["wall_seconds"] is None else f"{r['wall_seconds'] / 60:.1f}",
            "command": " then ".join(commands) or "not recorded", "commit": commit,
            "date": (s.get("started") or "")[:10] or "not recorded", "machine": "; ".join(machines),
            "rounds": rounds}   # summary.json's round records as they are (experiments/update_stats.py reads them)


def render(runs: list[Path], title: str = "Results") -> str:
    rows = [run_row(Path(r)) for r in runs]
    out = [f"# {title}", "",
           "Rendered by `python -m mpo_online.run.results " + " ".join(str(r) for r in runs) + "` from the run "
           "directories (summary.json, config.yaml, sessions.jsonl). Accuracy: held-out greedy, % of prompts. "
           "Wall minutes: the run's sessions together, from the job's start (warm start included, install not; a "
           "fork's include its source's up to the fork).", "",
           "| run | objective | model | CoT acc by round (0 = start) | gain | direct (last) | format fail (last) | "
           "held-out | pairs per round | minutes per round | wall minutes |",
           "|---|---|---|---|---:|---:|---:|---:|---|---|---:|"]
    for x in rows:
        out.append(f"| {x['run']} | {x['objective']} | {x['model']} | {x['cot']} | {x['gain']} | {x['direct']} | "
                   f"{x['format_fail']} | {x['n_heldout']} | {x['pairs']} | {x['minutes']} | {x['wall']} |")
    out += ["", "| run | command | commit | date | machine |", "|---|---|---|---|---|"]
    for x in rows:
        out.append(f"| {x['run']} | {x['command']} | {x['commit']} | {x['date']} | {x['machine']} |")
    out += group_table(rows)
    return "\n".join(out) + "\n"


def _groups(rows: list[dict]) -> list[tuple[list[dict], int]]:
    """Rows grouped by config-without-seeds, each with the number of rounds every run of the group reached (groups
    with a missing accuracy in those rounds are left out)."""
    groups: dict[str, list[dict]] = {}
    for x in rows:
        groups.setdefault(x["group"], []).append(x)
    out = []
    for xs in groups.values():
        n = min(len(x["cot_values"]) for x in xs)
        if not any(None in x["cot_values"][:n] for x in xs):
            out.append((xs, n))
    return out


def _group_labels(groups: list[tuple[list[dict], int]]) -> list[str]:
    """Each group's objective label, with its additions where another group has the same label."""
    labels = [xs[0]["objective"] for xs, _ in groups]
    return [f"{label} + {xs[0]['additions']}" if labels.count(label) > 1 and xs[0]["additions"] else label
            for label, (xs, _) in zip(labels, groups)]


def group_cells(rows: list[dict]) -> list[dict]:
    """Per group of seeds (see _groups): its runs and the display strings of the over-seeds table, plus `gains`, the
    per-run gains as fractions, and `runs`, the group's rows."""
    groups, cells = _groups(rows), []
    for (xs, k), objective in zip(groups, _group_labels(groups)):
        gains = [x["cot_values"][k - 1] - x["cot_values"][0] for x in xs]
        gain = _mean_se(gains)
        fails = [x["format_values"][k - 1] for x in xs]
        cells.append({"objective": objective, "model": xs[0]["model"], "runs": xs, "gains": gains,
                      "seeds": ", ".join(f"{x['run']} ({x['seed']})" for x in xs),
                      "cot": " → ".join(_mean_se([x["cot_values"][i] for x in xs]) for i in range(k)),
                      "gain": gain if gain.startswith("-") else "+" + gain,
                      "fail": "-" if None in fails else _mean_se(fails),
                      "minutes": ", ".join(f"{sum(x['minutes_values'][i] for x in xs) / len(xs):.1f}"
                                           for i in range(k - 1)) or "-"})
    return cells


def group_table(rows: list[dict]) -> list[str]:
    """Runs whose configs differ only in seeds, over those seeds: mean ± standard error per round."""
    out = ["", "Over seeds (runs whose configs differ only in `rollout.seed` / `trainer.seed`; mean ± standard error "
           "over the rounds every run of the group reached):", "",
           "| objective | model | runs (seed) | CoT acc by round (0 = start) | gain | format fail (last) | "
           "minutes per round (mean) |",
           "|---|---|---|---|---:|---:|---|"]
    for c in group_cells(rows):
        out.append(f"| {c['objective']} | {c['model']} | {c['seeds']} | {c['cot']} | {c['gain']} | {c['fail']} | "
                   f"{c['minutes']} |")
    return out


def plot(runs: list[Path], out: Path) -> None:
    """Held-out CoT accuracy by round, one line per group of seeds (mean, with a standard-error bar)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    groups = _groups([run_row(Path(r)) for r in runs])
    for (xs, n), objective in zip(groups, _group_labels(groups)):
        means, ses = zip(*(_mean_and_se([100 * x["cot_values"][i] for x in xs]) for i in range(n)))
        ax.errorbar(range(n), means, yerr=ses, marker="o", capsize=3,
                    label=f"{objective}, {xs[0]['model']} ({len(xs)} seed{'s' if len(xs) > 1 else ''})")
    ax.set_xlabel("round (0 = start)")
    ax.set_ylabel("held-out greedy CoT accuracy, %")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def markers(block: str | None) -> tuple[str, str]:
    """The marker lines of a named block ("<!-- results:demo:begin -->"); None: the default BEGIN, END."""
    return (BEGIN, END) if not block else (f"<!-- results:{block}:begin -->", f"<!-- results:{block}:end -->")


def render_into(text: str, runs: list[Path], block: str | None = None) -> str:
    """`text` (a README) with what lies between its BEGIN and END markers (those of `block`, see markers) replaced by
    the over-seeds table of `runs`, the command that rendered it, and the commits, dates and machines the runs were
    measured on."""
    rows = [run_row(Path(r)) for r in runs]
    lines = [*group_table(rows)[1:], "",
             "Rendered by `python -m mpo_online.run.results --into README.md "
             + (f"--block {block} " if block else "") + " ".join(str(r) for r in runs)
             + "`; each run's command: [docs/results.md](docs/results.md). Commits "
             + ", ".join(dict.fromkeys(f"`{x['commit']}`" for x in rows)) + "; "
             + ", ".join(dict.fromkeys(x["date"] for x in rows)) + "; " + "; ".join(dict.fromkeys(x["machine"]
                                                                                         for x in rows)) + "."]
    return replace_block(text, block, "\n".join(lines) + "\n")


def replace_block(text: str, block: str | None, body: str) -> str:
    """`text` with what lies between the marker lines of `block` (see markers) replaced by `body` (ending in a
    newline); ValueError unless there is one begin line and one end line after it."""
    begin, end = markers(block)
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"needs one {begin} line and one {end} line after it")
    head, rest = text.split(begin)
    return head + begin + "\n" + body + end + rest.split(end, 1)[1]


def add_into_args(p: argparse.ArgumentParser) -> None:
    """The `--into FILE --block NAME` options of the scripts that render a table between a file's markers."""
    p.add_argument("--into", type=Path, help="a file whose text between the block's results markers is replaced")
    p.add_argument("--block", default=None, help="with --into: the named block's markers (<!-- results:NAME:begin "
                   "-->) instead of the default ones")


def write_or_print(table: Callable[[str], str], into: Path | None, block: str | None) -> None:
    """`table(options)` (options: the `--into`/`--block` part of the command that rendered it, for its caption)
    written between `into`'s markers of `block`, or printed when `into` is None."""
    if into is None:
        print(table(""))
        return
    text = table(f"--into {into} " + (f"--block {block} " if block else ""))
    into.write_text(replace_block(into.read_text(), block, text))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--title", default="Results")
    add_into_args(p)
    p.add_argument("--plot", help="a PNG of accuracy by round, one line per group of seeds")
    a = p.parse_args(argv)
    runs = [Path(r) for r in a.runs]
    if a.plot:
        plot(runs, Path(a.plot))
    elif a.into:
        a.into.write_text(render_into(a.into.read_text(), runs, a.block))
    else:
        sys.stdout.write(render(runs, a.title))


if __name__ == "__main__":
    main()
