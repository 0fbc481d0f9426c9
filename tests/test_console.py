"""The loop's console (mpo_online/run/console.py): formatting, plain-lines and live modes, the final table, the training
progress file, and the redirection of component output to <run_dir>/logs/ (in a subprocess: it moves fds 1 and 2)."""

import io
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from mpo_online.run.console import (
    Console,
    eval_summary,
    fmt_clock,
    fmt_seconds,
    rollout_summary,
    rounds_table,
    train_progress_watcher,
    train_summary,
)
from mpo_online.run.logs import component_of
from mpo_online.trainer.progress import report_train_progress

ROOT = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_durations():
    assert [fmt_clock(s) for s in (0, 59.9, 61, 3599, 3661)] == ["0:00", "0:59", "1:01", "59:59", "1:01:01"]
    assert [fmt_seconds(s) for s in (0.21, 14.4, 165)] == ["0.2 s", "14 s", "2m 45s"]


def test_phase_summaries():
    stats = {"samples": 1024, "sample_accuracy": 0.244, "pass_at_k": 0.771, "rejects": 0,
             "pairs": {"correctness": 755, "dropout_ntp": 154}}
    assert rollout_summary(stats) == ("1024 samples, sample acc 24.4%, pass@k 77.1% -> 909 pairs "
                                      "(755 correctness, 154 dropout-ntp)")
    assert rollout_summary({"samples": 0, "pairs": {}, "rejects": 3}) == \
        "0 samples, sample acc -, pass@k - -> 0 pairs, 3 rejects"
    assert train_summary({"steps": 28, "loss": 0.4123, "reward_accuracy": 0.634}) == \
        "28 steps, loss 0.412, reward acc 0.63"
    assert train_summary({"steps": 500, "loss": 0.8}) == "500 steps, loss 0.800"  # SFT: no rewards
    assert train_summary({"skipped": "3 training rows < one global batch"}).startswith("skipped: 3 training rows")
    assert eval_summary({"accuracy_cot": 0.311, "accuracy_direct": 0.309, "format_failure_rate": 0.026,
                         "n_qa": 424}) == "CoT 31.1%, direct 30.9%, format fail 2.6% on 424 prompts"


def test_plain_lines_mode():
    clock, buf = Clock(), io.StringIO()
    c = Console(2, stream=buf, clock=clock, heartbeat=30.0)
    assert not c.live  # a StringIO is not a terminal
    c.phase(1, "rollouts")  # plain mode: the status line only after `heartbeat` seconds without output
    clock.t += 5
    c.count(512, 1024, "samples", "430 pairs")
    clock.t += 30
    c.count(768, 1024, "samples", "650 pairs")
    clock.t += 1
    secs = c.done({"samples": 1024, "pairs": {"correctness": 800}, "sample_accuracy": 0.25, "pass_at_k": 0.8})
    c.phase(1, "eval")
    clock.t += 4
    c.done({"accuracy_cot": 0.5, "accuracy_direct": 0.25, "format_failure_rate": 0.0, "n_qa": 8})
    lines = buf.getvalue().splitlines()
    assert secs == 36
    assert lines[0] == "[ 0:35] round 1/2 | rollouts | 768/1024 samples | 650 pairs | 0:35 in phase | last CoT acc -"
    assert lines[1] == ("[ 0:36] rollouts   r1  1024 samples, sample acc 25.0%, pass@k 80.0% -> 800 pairs (36 s)")
    assert lines[2].startswith("[ 0:40] eval       r1  CoT 50.0%, direct 25.0%") and lines[2].endswith("(4.0 s)")
    assert c.last_accuracy == 0.5 and len(lines) == 3
    assert "\r" not in buf.getvalue() and "\x1b" not in buf.getvalue()


def test_live_mode_redraws_the_status_line_under_permanent_lines():
    clock, buf = Clock(), io.StringIO()
    c = Console(3, stream=buf, live=True, clock=clock)
    c.phase(2, "train", watch=lambda: (3, 30, "steps", ""))
    clock.t += 12
    c.tick()  # what the ticker thread does every second: poll the watch function, redraw
    assert buf.getvalue().endswith("\r\x1b[2K[ 0:12] round 2/3 | train | [#.........] 3/30 steps | 0:12 in phase | "
                                   "last CoT acc -")
    c.line("hello")
    assert "\r\x1b[2Khello\n\r\x1b[2K[ 0:12] round 2/3 | train" in buf.getvalue()
    c.stop()
    assert buf.getvalue().endswith("\r\x1b[2K") and not c.live


def test_round_line_and_final_table(tmp_path):
    rounds = [{"round": 0, "eval": {"accuracy_cot": 0.333, "accuracy_direct": 0.316}, "pairs": {},
               "seconds": {"total": 6.71}},
              {"round": 1, "eval": {"accuracy_cot": 0.311, "accuracy_direct": 0.309},
               "pairs": {"pairs": {"correctness": 755, "dropout_ntp": 154}}, "seconds": {"total": 66.7}},
              {"round": 2, "eval": {}, "pairs": {"pairs": {}}, "seconds": {}}]
    assert rounds_table(rounds).splitlines() == [
        "round           CoT %  direct %  pairs  seconds",
        "0 (warm start)   33.3      31.6      -      6.7",
        "1                31.1      30.9    909     66.7",
        "2                   -         -      0        -"]
    clock, buf = Clock(), io.StringIO()
    c = Console(2, stream=buf, clock=clock)
    c.round_done(rounds[1], rounds[0])
    assert buf.getvalue().splitlines()[-1] == \
        "[ 0:00] == round 1/2 done: CoT 31.1% (was 33.3%), direct 30.9%, 909 pairs, 1m 06s"
    assert c.last_accuracy == 0.311
    c.finish(list(reversed(rounds)), tmp_path)
    out = buf.getvalue()
    assert "1                31.1      30.9    909     66.7" in out
    assert f"report  {tmp_path / 'report.md'}" in out and f"plot    {tmp_path / 'accuracy.png'}" in out
    assert "jobs/configs/learning_curve.yaml" in out


def test_train_progress_file(tmp_path):
    watch = train_progress_watcher(tmp_path)
    assert watch() == (None, None, "", "preparing (no step yet)")  # no file yet
    path = str(tmp_path / "round_0001" / "progress.json")
    report_train_progress(None, stage="train", step=1, total=2)  # other ranks: no-op
    report_train_progress(path, stage="ref", step=0, total=30)
    assert watch() == (None, None, "", "reference log-probs")
    report_train_progress(path, stage="train", step=3, total=30)
    assert watch() == (3, 30, "steps", "")
    assert not list(tmp_path.glob("**/*.tmp-*"))
    stale = tmp_path / "old" / "progress.json"  # a killed earlier call's file is not this call's progress
    stale.parent.mkdir()
    stale.write_text(json.dumps({"stage": "train", "step": 9, "total": 30, "time": time.time() - 3600}))
    os.utime(stale, (time.time() + 5, time.time() + 5))
    assert watch() == (None, None, "", "preparing (no step yet)")


def test_train_progress_relayed_by_the_session_board():
    """Without shared storage rank 0 hands its progress to a callable (the session's board); the board keeps the
    current job's last fields only, and answers a poll with (answers once complete, progress)."""
    from mpo_online.trainer.session import JobBoard
    board = JobBoard(world=2)
    first = board.post({"job": 1})
    report_train_progress(lambda **f: board.report(first, f), stage="train", step=1, total=4)
    assert board.poll(first) == (None, {"stage": "train", "step": 1, "total": 4})
    report_train_progress(lambda **f: 1 / 0, stage="train", step=2, total=4)  # a failing relay does not raise
    board.answer(first, 0, {"ok": 0})
    assert board.poll(first) == (None, {"stage": "train", "step": 1, "total": 4})  # rank 1 has not answered
    board.answer(first, 1, {"ok": 1})
    assert board.poll(first)[0] == {0: {"ok": 0}, 1: {"ok": 1}}
    second = board.post({"job": 2})
    board.report(first, {"stage": "train", "step": 4, "total": 4})  # a late relay of the earlier job is dropped
    assert board.poll(second) == (None, None) and board.poll(first) == (None, None)


def test_component_names():
    assert component_of("ServeReplica:mpo-policy:PolicyServer:policy") == "serve"
    assert component_of("ServeController") == "serve" and component_of("ProxyActor") == "serve"
    assert component_of("TrainController") == "train" and component_of("RayTrainWorker") == "train"
    assert component_of("MapBatches(_rollouts)") == "data" and component_of("ReadParquet") == "data"
    assert component_of("something_else") == "workers"


def test_component_logs_keep_the_terminal_quiet(tmp_path):
    """Console.for_run without --verbose: what the process prints goes to logs/driver.log, forwarded worker output
    to logs/<component>.log, error lines and an exception that ends the run still reach the terminal."""
    script = textwrap.dedent(f"""
        import logging, os, sys
        from mpo_online.run.console import Console
        c = Console.for_run({str(tmp_path)!r}, 2)
        print("ray data plan: lots of lines")
        os.write(2, b"C++ core worker line\\n")
        logging.getLogger("ray.serve").error("replica crashed")
        c.logs.write_batch({{"pid": 7, "actor_name": "ServeReplica:app:PolicyServer:policy", "ip": "h",
                            "localhost": "h", "lines": ["INFO vllm engine started", "ERROR engine died"]}})
        c.logs.write_batch({{"pid": 8, "task_name": "MapBatches(_rollouts)", "lines": ["task output"]}})
        c.phase(1, "train")
        c.done({{"steps": 3, "loss": 1.0}})
        raise RuntimeError("boom")
    """)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1
    terminal = out.stdout.splitlines()
    from mpo_online.run.machine import machine_line
    assert terminal[0].startswith(f"mpo-online: 2 round(s), run dir {tmp_path}, on {machine_line()}; component logs")
    assert re.search(r", \d+ cores, (AVX-512|AVX2|other);", terminal[0])
    assert f"{tmp_path / 'logs'}/" in terminal[0]
    assert "ERROR [ray.serve] replica crashed" in terminal
    assert "ERROR [serve] ERROR engine died" in terminal
    assert any(line.startswith("[ 0:00] train      r1  3 steps, loss 1.000") for line in terminal)
    assert "RuntimeError: boom" in out.stdout and "Traceback (most recent call last)" in out.stdout
    for noise in ("lots of lines", "C++ core", "engine started", "task output"):
        assert noise not in out.stdout + out.stderr
    assert out.stderr == ""
    logs = tmp_path / "logs"
    driver = (logs / "driver.log").read_text()
    assert "ray data plan" in driver and "C++ core worker line" in driver and "RuntimeError: boom" in driver
    serve = (logs / "serve.log").read_text().splitlines()
    assert serve == ["(ServeReplica:app:PolicyServer:policy pid=7) INFO vllm engine started",
                     "(ServeReplica:app:PolicyServer:policy pid=7) ERROR engine died"]
    assert (logs / "data.log").read_text() == "(MapBatches(_rollouts) pid=8) task output\n"


def test_forwarded_batches_are_routed_and_never_raise(tmp_path):
    """Ray's log thread calls write_batch: autoscaler monitor dumps are dropped (Ray prints only their events), and a
    batch arriving after stop() closed the files is ignored rather than raised into Ray's thread."""
    from mpo_online.run.logs import ComponentLogs
    logs = ComponentLogs(tmp_path)
    logs.write_batch({"pid": "autoscaler", "lines": ["INFO autoscaler.py:147 -- The autoscaler took 0.0 seconds",
                                                     "Node status", "Pending Demands:"]})
    logs.write_batch({"pid": 5, "actor_name": "RayTrainWorker", "lines": ["step"]})
    logs.stop()
    logs.write_batch({"pid": 5, "actor_name": "RayTrainWorker", "lines": ["after stop"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.log"]
    assert (tmp_path / "train.log").read_text() == "(RayTrainWorker pid=5) step\n"


def test_a_forwarded_traceback_reaches_the_console_as_its_exception(tmp_path):
    """A worker's traceback is reported by its exception line and where the whole of it is, not by "Traceback (most
    recent call last):" alone; other error lines are reported as they are."""
    from mpo_online.run.logs import ComponentLogs
    seen = []
    logs = ComponentLogs(tmp_path)
    logs.on_error = seen.append
    logs.write_batch({"pid": 7, "actor_name": "TrainController", "lines": [
        "Traceback (most recent call last):", '  File "x.py", line 1, in get', "    ray.get(",
        "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.", "ERROR worker died"]})
    logs.stop()
    assert seen == [f"[train] ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready. (traceback in "
                    f"{tmp_path}/train.log)", "[train] ERROR worker died"]
