"""Where the components' output goes while the loop's console owns the terminal (mpo_online.run.console, not --verbose).

    logs = ComponentLogs(run_dir / "logs", on_error=print_to_terminal)
    logs.start()          # from here on: this process's fd 1/2 -> logs/driver.log, Ray workers' lines -> by component
    ...
    logs.stop()           # restores fd 1/2 (also at exit)

  logs/driver.log   everything this process writes to fd 1/2 (Ray start-up, Ray Data's plans, Serve deploys, ...)
  logs/serve.log    forwarded output of the Serve controller, proxy and replicas, with the vLLM engines in them
  logs/train.log    Ray Train controller and workers (DeepSpeed)
  logs/data.log     Ray Data tasks and actors
  logs/workers.log  any other Ray worker
Ray's own per-process files stay in its session directory (`ray_session` links to it, local clusters only). Errors
still reach the terminal: ERROR records of the driver's loggers and (up to MAX_ERROR_LINES) forwarded worker lines
that report an ERROR or a traceback.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

MAX_ERROR_LINES = 20
_ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL|FATAL)\b|Traceback \(most recent call last\)")


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


def _error_summary(lines: list[str], i: int, log_path: str) -> str:
    """The console's line for an error line of a batch. A traceback's first line says nothing, so a traceback is
    reported by its exception line (the first unindented line after it in the batch) and where the rest is."""
    line = lines[i].strip()
    if line.startswith("Traceback (most recent call last)"):
        for later in lines[i + 1:]:
            if later.strip() and not later[0].isspace():
                return f"{later.strip()[:300]} (traceback in {log_path})"
    return line[:300]


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
        for i, line in enumerate(lines):
            f.write(prefix + line + "\n")
            if _ERROR_LINE.search(line):
                self._report_error(f"[{comp}] {_error_summary(lines, i, f'{self.dir}/{comp}.log')}")
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
