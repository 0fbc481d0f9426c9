"""The loop's terminal: a live status line, one line per finished phase and round, the rounds table at the end;
the components' own output (Ray, Ray Data, Ray Serve, vLLM, Ray Train, DeepSpeed) goes to files under
`<run_dir>/logs/` instead.

    console = Console.for_run(run_dir, total_rounds=5, verbose=False)   # redirects the component logs
    console.phase(1, "rollouts")
    console.count(512, 1024, "samples", "430 pairs")                     # live counters (any thread)
    console.done(stats)                                                   # "[ 3:45] rollouts r1 1024 samples, ..."
    console.round_done(entry)
    console.finish(rounds, run_dir)                                       # the table, report.md, accuracy.png

On a terminal the status line is redrawn in place every second (round, phase, done/total, elapsed, last accuracy).
Elsewhere (`ray job submit` job logs, CI, a pipe) it degrades to plain lines: the permanent lines, plus the status
line after every `heartbeat` seconds without output. `--verbose` (Console.for_run(verbose=True)) leaves every
component's output where it was (the terminal) and prints the console as plain lines among it.

Without --verbose the components' output goes to `<run_dir>/logs/` (mpo_online.run.logs.ComponentLogs says
which file gets what); errors still reach the terminal.

Training progress comes from the Ray Train workers through a small JSON file that rank 0 rewrites
(mpo_online.trainer.progress), which the console polls (`train_progress_watcher`).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from mpo_online.run.logs import ComponentLogs
from mpo_online.trainer.progress import TRAIN_PROGRESS_FILE

# ------------------------------------------------------------------------------------------------------ formatting

def fmt_clock(seconds: float) -> str:
    """Elapsed wall time as m:ss (h:mm:ss past an hour)."""
    s = int(max(0.0, seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fmt_seconds(seconds: float) -> str:
    """A duration for a finished phase: 0.2 s, 14 s, 2m 45s."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{int(seconds) // 60}m {int(seconds) % 60:02d}s"


def fmt_pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _n_pairs(pairs_stats: dict | None) -> int | None:
    """Pairs of a round from its recorded rollout stats (None: the round made none / round 0)."""
    kinds = (pairs_stats or {}).get("pairs")
    return sum(kinds.values()) if kinds is not None else None


def rollout_summary(stats: dict) -> str:
    kinds = stats.get("pairs") or {}
    by_kind = ", ".join(f"{n} {k.replace('_', '-')}" for k, n in kinds.items())
    text = (f"{stats.get('samples', 0)} samples, sample acc {fmt_pct(stats.get('sample_accuracy'))}, "
            f"pass@k {fmt_pct(stats.get('pass_at_k'))} -> {_n_pairs(stats) or 0} pairs")
    text += f" ({by_kind})" if len(kinds) > 1 else ""
    return text + (f", {stats['rejects']} rejects" if stats.get("rejects") else "")


def train_summary(metrics: dict) -> str:
    if "skipped" in metrics:
        return f"skipped: {metrics['skipped']}; the policy is kept"
    text = f"{metrics.get('steps', 0)} steps, loss {metrics.get('loss', float('nan')):.3f}"
    if "reward_accuracy" in metrics:
        text += f", reward acc {metrics['reward_accuracy']:.2f}"
    return text


def eval_summary(ev: dict) -> str:
    return (f"CoT {fmt_pct(ev.get('accuracy_cot'))}, direct {fmt_pct(ev.get('accuracy_direct'))}, "
            f"format fail {fmt_pct(ev.get('format_failure_rate'))} on {ev.get('n_qa', 0)} prompts")


def rounds_table(rounds: list[dict]) -> str:
    """The end-of-run table: held-out accuracy (CoT / direct), pairs and seconds per round (0 = warm start)."""
    rows = [("round", "CoT %", "direct %", "pairs", "seconds")]
    for r in sorted(rounds, key=lambda e: e["round"]):
        ev, n = r.get("eval", {}), _n_pairs(r.get("pairs"))
        pct = [("-" if ev.get(k) is None else f"{100 * ev[k]:.1f}") for k in ("accuracy_cot", "accuracy_direct")]
        secs = (r.get("seconds") or {}).get("total")
        rows.append((str(r["round"]) + (" (warm start)" if r["round"] == 0 else ""), *pct,
                     "-" if n is None else str(n), "-" if secs is None else f"{secs:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


# ---------------------------------------------------------------------------------------- train progress channel

def train_progress_watcher(storage_dir: str | os.PathLike) -> Callable[[], tuple | None]:
    """A poll function for Console.phase(watch=...): the newest progress file of any training run under
    `storage_dir` -> (done, total, unit, note); data preparation and Ray Train start-up show as "preparing"."""
    root = Path(storage_dir)
    t_start = time.time()

    def poll():
        files = []
        for p in root.glob(f"*/{TRAIN_PROGRESS_FILE}"):
            try:
                files.append((p.stat().st_mtime, p))
            except OSError:
                pass
        try:
            data = json.loads(max(files)[1].read_text()) if files else None
        except (OSError, ValueError):
            return None
        if not data or data.get("time", 0) < t_start - 1:  # a file from an earlier (killed) call, not yet rewritten
            return None, None, "", "preparing (no step yet)"
        if data.get("stage") == "ref":
            return None, None, "", "reference log-probs"
        return data.get("step"), data.get("total"), "steps", ""

    return poll


# -------------------------------------------------------------------------------------------------------- console

class Console:
    """The terminal view of a run; see the module docstring. Thread-safe: counters may come from any thread."""

    def __init__(self, total_rounds: int, *, stream=None, live: bool | None = None, clock=time.time,
                 heartbeat: float = 30.0, logs: ComponentLogs | None = None):
        self.total = total_rounds
        self.stream = stream or sys.stdout
        self.live = bool(getattr(self.stream, "isatty", lambda: False)()) if live is None else live
        self.clock = clock
        self.t0 = clock()
        self.heartbeat = heartbeat
        self.logs = logs
        self.last_accuracy: float | None = None
        self._lock = threading.RLock()
        self._round, self._phase, self._phase_t0 = 0, "setup", self.t0
        self._counter: tuple = (None, None, "", "")  # done, total, unit, note
        self._watch: Callable | None = None
        self._last_status_t = self.t0  # plain lines: when something was last printed
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    @classmethod
    def for_run(cls, run_dir, total_rounds: int, *, verbose: bool = False, stream=None) -> Console:
        """The recipe's console: unless verbose, component output goes to <run_dir>/logs/ (ComponentLogs)."""
        logs = None if verbose else ComponentLogs(Path(run_dir) / "logs")
        terminal = logs.start() if logs is not None else (stream or sys.stdout)
        console = cls(total_rounds, stream=terminal, live=False if verbose else None, logs=logs)
        if logs is not None:
            logs.on_error = console.error
            where = f"component logs (Ray, Serve, vLLM, Train, DeepSpeed) -> {logs.dir}/ (--verbose shows them here)"
        else:
            where = "--verbose: component logs are shown here"
        from mpo_online.run.machine import machine_line
        console.line(f"mpo-online: {total_rounds} round(s), run dir {run_dir}, on {machine_line()}; {where}")
        console.install_excepthook()
        console.start()
        return console

    def ray_started(self) -> None:
        """After ray.init: forwarded worker output goes to the component files and Ray Data draws no progress bars
        (unless verbose); a line says which cluster this is."""
        import ray
        if self.logs is not None:
            self.logs.attach_ray()
            ray.data.DataContext.get_current().enable_progress_bars = False
        address = os.environ.get("RAY_ADDRESS")
        self.done(f"{'connected to ' + address if address else 'local cluster'}, "
                  f"{ray.cluster_resources().get('CPU', 0):g} logical CPUs")

    # ---------------------------------------------------------------- state
    def phase(self, round_: int, name: str, *, watch: Callable[[], tuple | None] | None = None,
              note: str = "") -> None:
        """A phase starts: the status line shows it from now on (with `watch()`'s counters if given)."""
        with self._lock:
            self._round, self._phase, self._phase_t0 = round_, name, self.clock()
            self._counter, self._watch = (None, None, "", note), watch
        self._status()

    def count(self, done: int | None, total: int | None = None, unit: str = "", note: str = "") -> None:
        with self._lock:
            self._counter = (done, total, unit, note)
        self._status()

    def done(self, stats: dict | str = "") -> float:
        """The current phase finished: one permanent line summarising `stats` (a phase's stats dict or a text).
        Returns the phase's seconds."""
        with self._lock:
            name, r, seconds = self._phase, self._round, self.clock() - self._phase_t0
            self._watch = None
        summary = {"rollouts": rollout_summary, "train": train_summary, "warm start": train_summary,
                   "eval": eval_summary}.get(name, str)
        text = stats if isinstance(stats, str) else summary(stats)
        where = f"r{r}" if name in ("rollouts", "train", "swap", "eval") else ""
        self.line(f"[{fmt_clock(self.clock() - self.t0):>5}] {name:<10} {where:<3} {text} "
                  f"({fmt_seconds(seconds)})")
        if name == "eval" and isinstance(stats, dict) and stats.get("accuracy_cot") is not None:
            self.last_accuracy = stats["accuracy_cot"]
        return seconds

    def round_done(self, entry: dict, previous: dict | None = None) -> None:
        ev = entry.get("eval", {})
        before = f" (was {fmt_pct(previous['eval'].get('accuracy_cot'))})" if previous else ""
        self.last_accuracy = ev.get("accuracy_cot")
        self.line(f"[{fmt_clock(self.clock() - self.t0):>5}] == round {entry['round']}/{self.total} done: "
                  f"CoT {fmt_pct(ev.get('accuracy_cot'))}{before}, direct {fmt_pct(ev.get('accuracy_direct'))}, "
                  f"{_n_pairs(entry.get('pairs')) or 0} pairs, "
                  f"{fmt_seconds((entry.get('seconds') or {}).get('total', 0.0))}")

    def status_text(self) -> str:
        """The status line: round, phase, done/total (with a bar on a terminal), phase and total elapsed, last acc."""
        with self._lock:
            now = self.clock()
            done, total, unit, note = self._counter
            parts = [f"[{fmt_clock(now - self.t0):>5}] round {self._round}/{self.total}", self._phase]
            if done is not None:
                frac = done / total if total else None
                filled = round(10 * min(1.0, frac)) if frac is not None else 0
                bar = f"[{'#' * filled}{'.' * (10 - filled)}] " if self.live and frac is not None else ""
                parts.append(f"{bar}{done}" + (f"/{total}" if total else "") + (f" {unit}" if unit else ""))
            if note:
                parts.append(note)
            parts.append(f"{fmt_clock(now - self._phase_t0)} in phase")
            parts.append(f"last CoT acc {fmt_pct(self.last_accuracy)}")
            return " | ".join(parts)

    # ---------------------------------------------------------------- output
    def line(self, text: str) -> None:
        """A permanent line (the live status line is redrawn under it)."""
        with self._lock:
            self._last_status_t = self.clock()
            if self.live:
                self.stream.write("\r\x1b[2K" + text + "\n")
                self._draw()
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def error(self, text: str) -> None:
        self.line(f"ERROR {text}")

    def _draw(self) -> None:
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            width = 120
        self.stream.write("\r\x1b[2K" + self.status_text()[: max(20, width - 1)])
        self.stream.flush()

    def _status(self) -> None:
        """Live: redraw now. Plain lines: print the status after `heartbeat` seconds without output."""
        with self._lock:
            if self.live:
                self._draw()
                return
            now = self.clock()
            if now - self._last_status_t >= self.heartbeat:
                text = self.status_text()
                self._last_status_t = now
                self.stream.write(text + "\n")
                self.stream.flush()

    def tick(self) -> None:
        """Poll the phase's watch function and refresh the status (the ticker thread calls this every second)."""
        watch = self._watch
        if watch is not None:
            try:
                got = watch()
            except Exception:  # a progress probe must never stop the run
                got = None
            if got is not None:
                with self._lock:
                    if self._watch is watch:
                        self._counter = got
        self._status()

    def start(self) -> None:
        def run():
            while not self._stop.wait(1.0):
                self.tick()
        self._ticker = threading.Thread(target=run, name="mpo-console", daemon=True)
        self._ticker.start()

    def finish(self, rounds: list[dict], run_dir) -> None:
        """The rounds table and where the results are. Component output stays in the log files until the process
        exits (Ray's shutdown at exit writes there too); `close()` restores it earlier."""
        self.stop()
        run_dir = Path(run_dir)
        lines = ["", rounds_table(rounds), "",
                 f"report  {run_dir / 'report.md'}", f"plot    {run_dir / 'accuracy.png'}"]
        if self.logs is not None:
            lines.append(f"logs    {self.logs.dir}/")
        lines.append("more    the longer learning curve (jobs/configs/learning_curve.yaml) and every measured run: "
                     "docs/experiments.md")
        self.line("\n".join(lines))

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
            self._ticker = None
        with self._lock:
            if self.live:
                self.stream.write("\r\x1b[2K")
                self.live = False
            self.stream.flush()

    def close(self) -> None:
        self.stop()
        if self.logs is not None:
            self.logs.stop()

    def install_excepthook(self) -> None:
        """An exception that ends the run reaches the terminal (with its traceback), not only logs/driver.log."""
        previous = sys.excepthook

        def hook(exc_type, exc, tb):
            self.stop()
            if issubclass(exc_type, KeyboardInterrupt):
                self.line("interrupted; run the same command again to resume from the phase it was in")
            else:
                self.line("".join(traceback.format_exception(exc_type, exc, tb)).rstrip())
                if self.logs is not None:
                    self.line(f"(component logs: {self.logs.dir}/)")
            previous(exc_type, exc, tb)

        sys.excepthook = hook
