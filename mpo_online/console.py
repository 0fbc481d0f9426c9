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

Where component output goes without --verbose (ComponentLogs):
  logs/driver.log   everything this process writes to fd 1/2 (Ray start-up, Ray Data's plans, Serve deploys, ...)
  logs/serve.log    forwarded output of the Serve controller, proxy and replicas, with the vLLM engines in them
  logs/train.log    Ray Train controller and workers (DeepSpeed)
  logs/data.log     Ray Data tasks and actors
  logs/workers.log  any other Ray worker
Ray's own per-process files stay in its session directory (`ray_session` links to it, local clusters only). Errors
still reach the terminal: an exception that ends the run (with its traceback), ERROR records of the driver's loggers,
and (up to MAX_ERROR_LINES) forwarded worker lines that report an ERROR or a traceback.

Training progress comes from the Ray Train workers through a small JSON file that rank 0 rewrites
(`report_train_progress`), which the console polls (`train_progress_watcher`).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

TRAIN_PROGRESS_FILE = "progress.json"
MAX_ERROR_LINES = 20
_ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL|FATAL)\b|Traceback \(most recent call last\)")


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

def report_train_progress(path: str | None, **fields) -> None:
    """Rewrite the progress file (atomically) with `fields`, e.g. stage="train", step=3, total=30. A no-op for
    path None (ranks other than 0); never raises: progress must not break training."""
    if not path:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({**fields, "time": time.time()}, f)
        os.replace(tmp, path)
    except OSError:
        pass


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
                 heartbeat: float = 30.0, logs: "ComponentLogs | None" = None):
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
    def for_run(cls, run_dir, total_rounds: int, *, verbose: bool = False, stream=None) -> "Console":
        """The recipe's console: unless verbose, component output goes to <run_dir>/logs/ (ComponentLogs)."""
        logs = None if verbose else ComponentLogs(Path(run_dir) / "logs")
        terminal = logs.start() if logs is not None else (stream or sys.stdout)
        console = cls(total_rounds, stream=terminal, live=False if verbose else None, logs=logs)
        if logs is not None:
            logs.on_error = console.error
            where = f"component logs (Ray, Serve, vLLM, Train, DeepSpeed) -> {logs.dir}/ (--verbose shows them here)"
        else:
            where = "--verbose: component logs are shown here"
        console.line(f"mpo-online: {total_rounds} round(s), run dir {run_dir}; {where}")
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


# ------------------------------------------------------------------------------------------------- component logs

def component_of(name: str) -> str:
    """The log file (stem) for a Ray worker's forwarded output, by its actor or task name."""
    if name.startswith(("Serve", "ProxyActor", "PolicyRegistry")) or "Replica" in name:
        return "serve"
    if "Train" in name or name == "PlacementGroupCleaner":
        return "train"
    if name.startswith(("MapBatches", "Map(", "Read", "Write", "Split", "_StatsActor", "Repartition", "Filter",
                        "FlatMap", "RandomShuffle", "AutoscalingRequester", "DatasetStats")) or "Data" in name:
        return "data"
    return "workers"


class _ErrorMirror(logging.Handler):
    """ERROR records of the driver's loggers -> the console (the records still go to their usual handlers)."""

    def __init__(self, sink: Callable[[str], None]):
        super().__init__(logging.ERROR)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink(f"[{record.name}] {record.getMessage().splitlines()[0][:300]}")
        except Exception:
            pass


class ComponentLogs:
    """Redirect this process's fd 1/2 to logs/driver.log and Ray's forwarded worker output to per-component files.

    `start()` returns a stream on the original stdout (the terminal, or a job's log) for the console; `attach_ray()`
    (after ray.init) swaps Ray's printing of forwarded worker output for the per-component files; `stop()` undoes
    both. Ray's dispatcher of forwarded output is internal API: without it, that output lands in driver.log.
    """

    LOGGERS = ("", "ray", "ray.data", "ray.serve", "ray.train")  # ray's loggers do not propagate to the root

    def __init__(self, log_dir: str | os.PathLike, on_error: Callable[[str], None] | None = None):
        self.dir = Path(log_dir)
        self.on_error = on_error
        self._saved: dict[int, int] = {}
        self._files: dict[str, object] = {}
        self._mirror: _ErrorMirror | None = None
        self._errors = 0
        self._dispatcher = None
        self._stopped = False

    def start(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        terminal = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        fd = os.open(self.dir / "driver.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for target in (1, 2):
            self._saved[target] = os.dup(target)
            os.dup2(fd, target)
        os.close(fd)
        self._mirror = _ErrorMirror(self._report_error)
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self._mirror)
        atexit.register(self.stop)  # runs after Ray's own exit handler (registered later, when ray is imported)
        return terminal

    def attach_ray(self) -> None:
        """Route forwarded worker output to serve/train/data/workers.log and link Ray's session logs."""
        import ray
        try:
            session = ray._private.worker.global_worker.node.get_session_dir_path()
            link = self.dir / "ray_session"
            if os.path.lexists(link):
                link.unlink()
            link.symlink_to(Path(session) / "logs", target_is_directory=True)
        except Exception:  # a cluster we only connected to (ray job submit) has no local session dir object
            pass
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            return
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("mpo_component_logs", self.write_batch)
        self._dispatcher = dispatcher

    def write_batch(self, data: dict) -> None:
        """One batch of a worker's forwarded lines (Ray's dispatcher format: pid, actor_name/task_name, lines).
        Runs in Ray's log thread: it must not raise (a file closed by stop() meanwhile, an unexpected batch)."""
        try:
            self._write_batch(data)
        except Exception:
            pass

    def _write_batch(self, data: dict) -> None:
        name = data.get("actor_name") or data.get("task_name") or ""
        pid, lines = data.get("pid"), data.get("lines", [])
        if self._stopped:  # a batch already in flight when stop() removed the handler
            return
        if pid == "autoscaler":  # the monitor's whole log is published; Ray prints only its events, so do we
            try:
                from ray._private.worker import filter_autoscaler_events
                lines = list(filter_autoscaler_events(lines))
            except ImportError:
                lines = []
        if not lines:
            return
        comp = component_of(name) if name else "workers"  # also raylet / autoscaler messages
        f = self._file(comp)
        ip = "" if data.get("ip") == data.get("localhost") else f", ip={data.get('ip')}"
        prefix = f"({name + ' ' if name else ''}pid={pid}{ip}) "
        for line in lines:
            f.write(prefix + line + "\n")
            if _ERROR_LINE.search(line):
                self._report_error(f"[{comp}] {line.strip()[:300]}")
        f.flush()

    def _file(self, comp: str):
        if comp not in self._files:
            self._files[comp] = open(self.dir / f"{comp}.log", "a", encoding="utf-8", errors="replace")
        return self._files[comp]

    def _report_error(self, text: str) -> None:
        if self.on_error is None:
            return
        self._errors += 1
        if self._errors <= MAX_ERROR_LINES:
            self.on_error(text)
        elif self._errors == MAX_ERROR_LINES + 1:
            self.on_error(f"more error lines follow only in {self.dir}/")

    def stop(self) -> None:
        self._stopped = True
        if self._dispatcher is not None:
            self._dispatcher.remove_handler("mpo_component_logs")
            self._dispatcher = None
        if self._mirror is not None:
            for name in self.LOGGERS:
                logging.getLogger(name).removeHandler(self._mirror)
            self._mirror = None
        sys.stdout.flush()
        sys.stderr.flush()
        for target, saved in self._saved.items():
            os.dup2(saved, target)
            os.close(saved)
        self._saved.clear()
        for f in self._files.values():
            f.close()
        self._files.clear()
