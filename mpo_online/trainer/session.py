"""A training worker group that lives for the whole run: one Ray Train + DeepSpeed run whose workers train round
after round, so no round pays for Ray Train start-up, worker imports and teardown again.

    import ray
    from mpo_online.trainer.session import TrainerSession
    ray.init(num_cpus=4)                                   # the caller owns Ray
    session = TrainerSession.start(num_workers=2, worker_cpus=1, storage_dir="runs/x/trainer_session")
    res = session.train("runs/x/rounds/round_0001/pairs.parquet", policy_dir="runs/x/policy_0",
                        out_dir="runs/x/policy_1", objective="mpo", engine_reference=True, lr=1e-4,
                        micro_batch_size=8, global_batch_size=32, seed=1)     # -> TrainResult, as train_policy's
    session.close()

How. `start` launches `TorchTrainer(session_fn)` once, in a driver thread (fit() blocks until the run ends). The
workers (torch.distributed / gloo set up by Ray Train, torch + DeepSpeed imported once) wait on a `JobBoard` actor.
`train` reads the round's pairs, shuffles them with the seed into one equal shard per worker (Ray's equal split:
n // workers rows each, the remainder dropped; micro-batch ticks grouped by length: trainer/ordering.py), posts the
job, and waits for every worker's answer. Each worker runs the same `worker.train_worker` as a per-call Ray Train
run (fresh DeepSpeed engine and AdamW state from the job's policy; delta carried by the caller), with its shard as a
list of rows; rank 0 writes the Hugging Face export straight into a temp dir beside `out_dir`, which the driver
completes and renames (one safetensors write, read by every engine replica at the swap). Without shared storage
(`ship_files`) the job also carries the policy and reference directories as object refs, which each worker writes to
its node at the same paths first, and rank 0 sends the export back the same way (mpo_online/run/shipping.py);
its progress fields go through the board too, and the driver writes the console's progress file.

Failure: a worker that raises ends the Ray Train run (no restarts: the round is redone from its inputs, which gives
the same result: data order and seeds are fixed); `train` raises RuntimeError with the worker's error, and the
session is closed. A killed job resumes at its round phase as before (mpo_online/run/state.py).
"""

from __future__ import annotations

import asyncio
import importlib
import shutil
import threading
import time
import traceback
import uuid
from pathlib import Path

from mpo_online.run.shipping import pack_dir, write_files
from mpo_online.trainer.launch import (
    TrainResult,
    _cached,
    call_record,
    check_objective,
    hyper_settings,
    publish_in_place,
    train_columns,
    worker_config,
    worker_runtime_env,
    worker_scaling,
)
from mpo_online.trainer.ordering import length_grouped_shards
from mpo_online.trainer.progress import report_train_progress

POLL_SECONDS = 0.05


class JobBoard:
    """The one job in flight and the workers' answers (a Ray actor; async, so waiting callers do not block it)."""

    def __init__(self, world: int):
        self.world, self.job, self.job_id, self.closed, self.results = world, None, 0, False, {}
        self.progress = None  # rank 0's last progress fields of the current job, when it cannot write the file

    def post(self, job: dict) -> int:
        self.job_id += 1
        self.job, self.results, self.progress = job, {}, None
        return self.job_id

    def close(self) -> None:
        self.closed = True

    async def take(self, after: int):
        """Block until a job newer than `after` is posted (-> (id, job)) or the board closes (-> None)."""
        while not self.closed and self.job_id <= after:
            await asyncio.sleep(POLL_SECONDS)
        return None if self.closed else (self.job_id, self.job)

    def answer(self, job_id: int, rank: int, result: dict) -> None:
        if job_id == self.job_id:
            self.results[rank] = result

    def report(self, job_id: int, fields: dict) -> None:
        if job_id == self.job_id:
            self.progress = fields

    def poll(self, job_id: int):
        """(the answers to job `job_id` once every rank answered or one failed, else None; its last progress)."""
        done = len(self.results) == self.world or any("error" in r for r in self.results.values())
        current = job_id == self.job_id
        return (dict(self.results) if current and done else None), (self.progress if current else None)


def session_fn(config: dict) -> None:
    """Ray Train entry point of a session: take jobs until the board closes."""
    import ray
    import ray.train

    from mpo_online.run.shipping import ensure_local, pack_dir, remove_copy
    from mpo_online.trainer.worker import train_worker

    # what every job imports, imported once while the engines start (deepspeed alone takes seconds)
    for name in ("deepspeed", "transformers", "mpo_online.trainer.batching", "mpo_online.trainer.checkpointing",
                 "mpo_online.trainer.logps", "mpo_online.trainer.losses", "mpo_online.run.console"):
        importlib.import_module(name)

    board, rank, last, shipped = config["board"], ray.train.get_context().get_world_rank(), 0, set()
    while (item := ray.get(board.take.remote(last))) is not None:
        last, job = item
        rows = ray.get(job["shards"][rank])
        try:
            # no shared storage: the job's checkpoints, written to this node (by one worker of the node) where
            # missing; the last job's copies are not kept (every call would leave a checkpoint on the node)
            for path in shipped - set(job["ship"]):
                remove_copy(path)
            shipped = set(job["ship"])
            for path, (digest, ref) in job["ship"].items():
                ensure_local(path, digest, lambda ref=ref: ray.get(ref))
            kwargs = job["kwargs"]
            if job["ship"] and kwargs.get("progress_file"):  # the file would land on this node: the driver writes it
                kwargs = {**kwargs, "progress_file": lambda job_id=last, **f: board.report.remote(job_id, f)}
            out = train_worker(**kwargs, rows=rows, export_dir=job["export_dir"])
            if job["ship"] and rank == 0:   # ... and the new policy back to the driver (it fetches it at once)
                out["export"] = ray.put(pack_dir(job["export_dir"]))
                shutil.rmtree(job["export_dir"], ignore_errors=True)  # the driver writes it from the pack
            ray.get(board.answer.remote(last, rank, out))
        except BaseException:
            ray.get(board.answer.remote(last, rank, {"error": traceback.format_exc()}))
            raise   # a collective may be half done on the other ranks: end the run rather than continue


def session_kwargs(res) -> dict:
    """`TrainerSession.start` kwargs (all but storage_dir) from config.ResourcesConfig."""
    return dict(num_workers=res.train_workers, worker_cpus=res.train_worker_cpus, worker_gpus=res.train_worker_gpus,
                worker_resources=dict(res.train_worker_resources), ship_files=not res.shared_storage)


class TrainerSession:
    """Driver handle of the long-lived worker group. Not thread-safe: one `train` call at a time."""

    def __init__(self, board, thread: threading.Thread, fit_error: list, *, num_workers: int, worker_cpus: float,
                 ship_files: bool = False):
        self.board, self._thread, self._fit_error = board, thread, fit_error
        self.num_workers, self.worker_cpus, self.ship_files = num_workers, worker_cpus, ship_files
        self.closed = False

    @classmethod
    def start(cls, *, num_workers: int = 2, worker_cpus: float = 1.0, worker_gpus: float = 0.0,
              worker_resources: dict | None = None, ship_files: bool = False, storage_dir,
              name: str | None = None) -> TrainerSession:
        """worker_resources: custom Ray resources per worker (node pinning). ship_files: the workers may not see
        the driver's files: each call ships its policy / reference directories to them and the new policy back
        through the object store (mpo_online/run/shipping.py); otherwise they read and write the driver's paths."""
        import ray
        from ray.train import FailureConfig, RunConfig
        from ray.train.torch import TorchTrainer

        board = ray.remote(num_cpus=0)(JobBoard).remote(num_workers)
        trainer = TorchTrainer(
            session_fn, train_loop_config={"board": board},
            scaling_config=worker_scaling(num_workers, worker_cpus, worker_gpus, worker_resources),
            run_config=RunConfig(name=name or f"session-{uuid.uuid4().hex[:8]}",
                                 storage_path=str(Path(storage_dir).resolve()),
                                 failure_config=FailureConfig(max_failures=0),
                                 worker_runtime_env=worker_runtime_env()))
        fit_error: list = []

        def fit():
            try:
                trainer.fit()
            except BaseException as exc:  # TrainingFailedError carries the worker's traceback
                fit_error.append(exc)

        thread = threading.Thread(target=fit, name="mpo-trainer-session", daemon=True)
        thread.start()
        return cls(board, thread, fit_error, num_workers=num_workers, worker_cpus=worker_cpus, ship_files=ship_files)

    def train(self, dataset, *, policy_dir, out_dir, ref_dir=None, objective: str = "mpo", weights=None,
              beta: float = 0.1, delta_state: dict | None = None, run_name: str | None = None, progress_file=None,
              engine_reference: bool = False, shuffle: bool = True, group_by: str = "length",
              _nan_on_micro_batches=(), _fail_after_step: int | None = None, **hyper) -> TrainResult:
        """One training call on the live workers; arguments and result as mpo_online.trainer.train_policy's.

        dataset: a parquet file in the pair schema. engine_reference: the reference is the policy that sampled the
        pairs (`mpo.reference: previous`), so reference log-probs come from the engine's sampling log-probs where
        the rows carry them (worker.engine_ref_logps), from the trainer's pass for the others. shuffle: a seeded
        shuffle, with the rows of a micro-batch tick grouped by `group_by` (length | images | none;
        mpo_online.trainer.ordering); False: the file's order, one contiguous shard per worker.
        hyper: lr, weight_decay, warmup_ratio, epochs, micro_batch_size, global_batch_size, zero_stage, precision,
        max_grad_norm, max_nonfinite_steps, logps_chunk_size, max_length, delta_mode, delta_ema_decay, seed.
        Test hooks: `_nan_on_micro_batches`; `_fail_after_step`: the last worker is SIGKILLed after that step."""
        import pyarrow.parquet as pq
        import ray

        if self.closed:
            raise RuntimeError("the trainer session is closed")
        t_call = time.time()
        hyper = hyper_settings(**hyper)
        pairs, w = check_objective(objective, weights, zero_stage=hyper["zero_stage"], precision=hyper["precision"])
        out_dir = Path(out_dir).resolve()
        run_name = run_name or f"train-{out_dir.name}"
        cached = _cached(out_dir, run_name)
        if cached is not None:
            return cached
        out_dir.parent.mkdir(parents=True, exist_ok=True)

        # the data: columns training reads, a seeded shuffle into one equal shard per worker
        t0 = time.time()
        table = pq.read_table(str(dataset))
        rows = table.select(train_columns(table.column_names, pairs=pairs)).to_pylist()
        if shuffle:
            parts = length_grouped_shards(rows, world=self.num_workers, micro_batch_size=hyper["micro_batch_size"],
                                          seed=hyper["seed"], group_by=group_by)
        else:
            per = len(rows) // self.num_workers
            parts = [rows[i * per:(i + 1) * per] for i in range(self.num_workers)]
        shards = [ray.put(part) for part in parts]
        config, plan = worker_config(
            len(rows), policy_dir=policy_dir, ref_dir=ref_dir, objective=objective, weights=w, beta=beta,
            delta_state=delta_state, num_workers=self.num_workers, worker_cpus=self.worker_cpus,
            progress_file=str(Path(progress_file).resolve()) if progress_file else None,   # workers' cwd differs
            hyper=hyper, checkpoint_every=0, engine_reference=engine_reference,
            nan_on_micro_batches=tuple(_nan_on_micro_batches), fail_after_step=_fail_after_step)
        export = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
        prep_seconds = time.time() - t0

        ship = {}
        if self.ship_files:
            for d in {config["policy_dir"], config["ref_dir"]} - {None}:
                packed = pack_dir(d)
                ship[d] = (packed["digest"], ray.put(packed))
        job_id = ray.get(self.board.post.remote({"kwargs": config, "shards": shards, "export_dir": str(export),
                                                 "ship": ship}))
        try:
            answers = self._wait(job_id, config["progress_file"] if self.ship_files else None)
            errors = [a["error"] for a in answers.values() if "error" in a]
            if errors:
                self.close()
                raise RuntimeError(f"training call {run_name!r} failed on a worker:\n{errors[0]}")
            if self.ship_files:  # rank 0 sent the export (and removed its own, wherever it ran)
                write_files(export, ray.get(answers[0]["export"])["files"])
        except BaseException:
            shutil.rmtree(export, ignore_errors=True)
            raise
        t_done = time.time()
        state = answers[0]
        metrics = dict(state["metrics"])
        metrics.update(pairs=len(rows), prep_seconds=prep_seconds, fit_seconds=t_done - t_call - prep_seconds,
                       startup_seconds=metrics["worker_start_time"] - (t_call + prep_seconds),  # job hand-over
                       teardown_seconds=t_done - metrics["worker_done_time"], grad_accum=plan["grad_accum"],
                       num_workers=self.num_workers, objective=objective, session=True)
        t0 = time.time()
        publish_in_place(export, policy_dir=config["policy_dir"], out_dir=out_dir,
                         record=call_record(run_name, out_dir, config, metrics, state))
        metrics["publish_seconds"] = time.time() - t0
        metrics["total_seconds"] = time.time() - t_call
        return TrainResult(policy_dir=str(out_dir), metrics=metrics, delta_state=state["delta"],
                           history=state["history"], run_name=run_name)

    def _wait(self, job_id: int, progress_file: str | None = None) -> dict:
        """The job's answers; meanwhile rank 0's progress relayed by the board goes to `progress_file` (if given)."""
        import ray
        written = None
        while True:
            answers, progress = ray.get(self.board.poll.remote(job_id))
            if progress_file and progress and progress != written:
                report_train_progress(progress_file, **progress)
                written = progress
            if answers is not None:
                return answers
            if not self._thread.is_alive():   # the Ray Train run ended under us
                self.closed = True
                err = self._fit_error[0] if self._fit_error else "the run ended"
                raise RuntimeError(f"the trainer session's Ray Train run ended: {err}")
            time.sleep(POLL_SECONDS * 4)

    def close(self, timeout: float = 60.0) -> None:
        """Let the workers leave their loop and the Ray Train run finish."""
        import ray
        if self._thread.is_alive():
            try:
                ray.get(self.board.close.remote(), timeout=10)
            except Exception:  # the board may be gone with a failed run
                pass
            self._thread.join(timeout)
        self.closed = True
