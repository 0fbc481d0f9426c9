"""The online MPO loop: the Ray job entry point and the recipe users read.

    ray job submit --working-dir . -- python jobs/online_mpo.py --config jobs/configs/tiny_cpu.yaml
    python jobs/online_mpo.py --config jobs/configs/tiny_cpu.yaml [key=value ...] [--force] [--keep-serving] [--verbose]
    mpo-online run --config jobs/configs/tiny_cpu.yaml            (the same, through the console script)

Setup (Ray, warm-start policy v0, prompts, the Serve app) -> round 0 evaluation -> for each round:
rollouts + pairs (Ray Data, sampling from the served policy) -> MPO update (Ray Train + DeepSpeed, on one worker
group that lives for the whole job: mpo_online/trainer/session.py) -> publish and hot-swap version r into the running
engines -> evaluate the served policy -> record -> next round; cleanup.

Every phase ends by rewriting the round's manifest, so killing this job at any moment and starting it again with
the same run directory resumes at the phase it was in (see mpo_online/run/state.py).

The terminal shows the loop (mpo_online/run/console.py): a live status line, one line per finished phase and round, the
rounds table at the end. Ray, Serve, vLLM, Ray Data and Ray Train output goes to <run_dir>/logs/ (--verbose: here).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import NamedTuple

from mpo_online.config import load_config
from mpo_online.data.records import RoundManifest
from mpo_online.run.cluster import check_shared_paths
from mpo_online.run.console import Console, train_progress_watcher
from mpo_online.run.report import Reporter
from mpo_online.run.state import RunDir, RunDirError, phase_at_least
from mpo_online.trainer.progress import TRAIN_PROGRESS_FILE


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="online MPO: rollouts -> pairs -> train -> hot-swap -> eval, per round")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. trainer.lr=1e-5")
    p.add_argument("--force", action="store_true", help="continue a run directory made by a different config")
    p.add_argument("--keep-serving", action="store_true", help="keep the endpoint up after the last round")
    p.add_argument("--verbose", action="store_true",
                   help="show the components' output (Ray, Serve, vLLM, Train) here instead of in <run_dir>/logs/")
    return p.parse_args(argv)


def connect_ray(resources) -> None:
    """Attach to the cluster a `ray job submit` runs us on (RAY_ADDRESS), else start a local Ray sized by the config."""
    import ray
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, include_dashboard=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    run = RunDir.open(cfg.loop.run_dir, cfg, force=args.force)
    run.record_session(["python", "jobs/online_mpo.py", *(argv if argv is not None else sys.argv[1:])])
    console = Console.for_run(run.root, cfg.loop.rounds, verbose=args.verbose)
    reporter = Reporter(run.root, cfg.hash())
    t0 = time.time() - reporter.wall_seconds_so_far()

    # --- setup: Ray, the warm-start policy (v0), prompts, the Serve app on the newest swapped policy --------------
    import pyarrow.parquet as pq

    from mpo_online.data.prompts import load_prompts, to_ray_dataset
    from mpo_online.evaluate import evaluate
    from mpo_online.rollout.pipeline import run_round
    from mpo_online.synthetic.chains import pair_chain_rates, synthetic_meta
    from mpo_online.trainer.session import TrainerSession, session_kwargs
    from mpo_online.warm_start import warm_start_from_config
    from serving.app import serving_kwargs, start_policy_server, start_serve, stop_policy_server

    console.phase(0, "ray")
    connect_ray(cfg.resources)
    # a cluster's engines and training workers read and write the run directory and the base checkpoint at the
    # driver's paths: a node that does not see them is one clear error now, not a stack trace minutes in. Without
    # shared storage (resources.shared_storage: false) they get what they need through the object store instead
    ship = not cfg.resources.shared_storage
    if not ship:
        check_shared_paths(*shared_paths(cfg, run.root))
    console.ray_started()
    # the training worker group lives for the whole job: it starts in the background (Ray Train start-up, imports)
    # while the model and tasks are built, then runs the warm start and every round's update
    pending = [r for r in range(1, cfg.loop.rounds + 1) if not phase_at_least(run.manifest(r), "trained")]
    session = TrainerSession.start(storage_dir=str(run.root / "trainer_session"), **session_kwargs(cfg.resources)) \
        if pending or not run.has_policy(0) else None
    # Serve's controller and HTTP proxy start meanwhile (the app itself waits for policy v0)
    serve_boot = threading.Thread(target=start_serve, kwargs={"port": cfg.serving.port}, daemon=True)
    serve_boot.start()
    console.phase(0, "warm start", watch=train_progress_watcher(run.root / "warm_start_train"))
    warm = warm_start_from_config(cfg, force=True, evaluate_offline=False, session=session)  # run dir checked above
    console.done(warm.get("train") or warm.get("note") or "policy v0 from an earlier session")
    train_rows, quarantine = load_prompts(f"{warm['data']}/train.parquet", images_anywhere=cfg.data.images_anywhere,
                                          quarantine_path=run.root / "prompts_rejects.jsonl")
    # rows without a gold answer only make Dropout-NTP pairs: with it off they are not sampled (they were ~25% of a
    # round's generated tokens on the tiny default)
    prompts = to_ray_dataset(train_rows if rollout_kwargs(cfg)["dropout_ntp"]
                             else [r for r in train_rows if r.get("answer") is not None])
    task_meta = synthetic_meta(train_rows)
    heldout = load_prompts(f"{warm['data']}/heldout.parquet", quarantine_path=run.root / "heldout_rejects.jsonl",
                           images_anywhere=cfg.data.images_anywhere)[0]
    console.phase(0, "serve", note=f"starting {cfg.serving.replicas} replica(s)")
    serve_boot.join()
    client = start_policy_server(str(run.policy_dir(0)), dtype=cfg.model.dtype, served_from={"run_dir": str(run.root)},
                                 **serving_kwargs(cfg.serving, cfg.resources))
    swapped = [r for r in range(1, cfg.loop.rounds + 1) if phase_at_least(run.manifest(r), "swapped")]
    if swapped:  # resuming: serve the newest policy that had been swapped in, through the same publish protocol
        publish_policy(client, max(swapped), run.policy_dir(max(swapped)), ship)
    console.done(f"{cfg.serving.replicas} replica(s) serving policy v{max(swapped, default=0)}"
                 + (" (reused: an earlier session left the app running)" if client.reused else ""))

    def served_generate(requests):
        results = client.generate(requests, chunks=EVAL_CHUNKS,
                                  progress=lambda done, total: console.count(done, total, "answers"))
        return [res["outputs"][0]["text"] if not res.get("error") else "" for res in results]

    def evaluate_served() -> dict:
        return evaluate(served_generate, heldout, cot_instruction=cfg.data.cot_instruction,
                        direct_instruction=cfg.data.direct_instruction, max_tokens=cfg.rollout.max_tokens)

    if 0 not in reporter.rounds:  # round 0 = the warm-start policy
        console.phase(0, "eval")
        t = time.time()
        ev = evaluate_served()
        console.done(ev)
        reporter.record_round({"round": 0, "policy_version": 0, "eval": ev, "pairs": {}, "train": warm.get("train", {}),
                               "seconds": {"eval": time.time() - t, "total": time.time() - t}}, time.time() - t0)
    console.last_accuracy = reporter.rounds[max(reporter.rounds)]["eval"]["accuracy_cot"]

    for r in range(1, cfg.loop.rounds + 1):
        m = run.manifest(r) or RoundManifest(round=r, phase="started", policy_version=r - 1,
                                             seeds={"rollout": cfg.rollout.seed + r, "train": cfg.trainer.seed + r})
        if phase_at_least(m, "done"):
            continue
        changed = run.verify_files(m)  # resuming past a phase whose outputs were since changed would mix runs
        if changed:
            raise RunDirError(f"round {r}: {', '.join(changed)} changed since the manifest recorded it; restore it "
                              f"or delete {run.round_dir(r)} to redo the round")
        run.save_manifest(m)
        rdir = run.round_dir(r)

        # 1. rollouts from the served policy v(r-1) -> verified -> preference pairs (Ray Data, streaming)
        if not phase_at_least(m, "pairs"):
            console.phase(r, "rollouts")
            t = time.time()
            stats = run_round(prompts, client=client, round=r, policy_version=r - 1, out_dir=str(run.root / "rounds"),
                              policy_dir=str(run.policy_dir(r - 1)), seed=m.seeds["rollout"],
                              progress=lambda done, total, n_pairs: console.count(done, total, "samples",
                                                                                  f"{n_pairs} pairs"),
                              **rollout_kwargs(cfg))
            # + how the chosen / rejected chains hold up (synthetic tasks: do the pairs prefer right readings?)
            m.stats["pairs"] = {**stats.to_dict(), "chains": pair_chain_rates(
                pq.read_table(rdir / "pairs.parquet").to_pylist(), task_meta)}
            for name in ("pairs.parquet", "rollouts.parquet"):
                run.record_file(m, rdir / name)
            run.advance(m, "pairs", rollout=time.time() - t)
            console.done(m.stats["pairs"])

        # 2. MPO update on this round's pairs (Ray Train + DeepSpeed); reference = warm start or last round's policy;
        #    with sft.unpaired, then SFT on the checked samples of the prompts without a pair
        if not phase_at_least(m, "trained"):
            console.phase(r, "train", watch=train_progress_watcher(rdir / "train"))
            t = time.time()
            prev = run.manifest(r - 1) if r > 1 else None
            calls = [c for c in training_calls(cfg, rdir, {row["id"]: row for row in train_rows})
                     if c.rows >= cfg.trainer.global_batch_size]  # less than one optimizer step of data: skipped
            m.delta = prev.delta if prev else {}
            if not calls:  # keep the policy as it is
                copy_policy(run.policy_dir(r - 1), run.policy_dir(r))
                m.stats["train"] = {"skipped": "fewer training rows than one global batch"}
            src, results = run.policy_dir(r - 1), {}
            for i, c in enumerate(calls):
                last = i == len(calls) - 1
                dst = run.policy_dir(r) if last else rdir / f"policy_after_{c.objective}"
                name = f"round_{r:04d}" if last else f"round_{r:04d}_{c.objective}"
                pref = c.objective not in ("sft", "rft")
                ref = run.policy_dir(0 if cfg.mpo.reference == "initial" else r - 1) if pref else None
                result = session.train(
                    c.path, policy_dir=str(src), out_dir=str(dst), ref_dir=None if ref is None else str(ref),
                    objective=c.objective, weights=cfg.mpo.weights() if pref else (0.0, 0.0, 1.0),
                    beta=cfg.mpo.beta, delta_state=prev.delta if prev else None, run_name=name,
                    progress_file=str(rdir / "train" / name / TRAIN_PROGRESS_FILE),
                    # the pairs were sampled by policy r-1: with reference "previous" their engine log-probs are
                    # the reference's, so most pairs need no reference pass
                    engine_reference=cfg.mpo.reference == "previous" and cfg.mpo.engine_reference,
                    **trainer_kwargs(cfg, m.seeds["train"]))
                if pref:
                    m.delta = result.delta_state
                results[c.objective] = result.metrics
                src = dst
            if calls:
                m.stats["train"] = round_train_metrics(results)
            run.advance(m, "trained", train=time.time() - t)
            console.done(m.stats["train"])

        # 3. hot-swap: every replica serves version r before the round goes on
        if not phase_at_least(m, "swapped"):
            console.phase(r, "swap")
            t = time.time()
            swap = publish_policy(client, r, run.policy_dir(r), ship)
            fault_point(r, "swap")
            run.advance(m, "swapped", swap=time.time() - t)
            console.done(f"policy v{r} live on {len(swap['replicas'])} replica(s)")

        # 4. evaluate the served policy on the held-out set (greedy; CoT and direct answer)
        if not phase_at_least(m, "evaluated"):
            console.phase(r, "eval")
            t = time.time()
            m.stats["eval"] = evaluate_served()
            fault_point(r, "eval")
            run.advance(m, "evaluated", eval=time.time() - t)
            console.done(m.stats["eval"])

        # 5. record
        m.seconds["total"] = sum(m.seconds.get(k, 0.0) for k in ("rollout", "train", "swap", "eval"))
        reporter.record_round({"round": r, "policy_version": r, "eval": m.stats["eval"],
                               "pairs": m.stats["pairs"], "train": {**m.stats["train"], "delta": m.delta},
                               "seconds": m.seconds}, time.time() - t0)
        console.round_done(reporter.rounds[r], reporter.rounds.get(r - 1))
        run.advance(m, "done")

    # --- cleanup ----------------------------------------------------------------------------------------------------
    if session is not None:
        session.close()
    console.finish(list(reporter.rounds.values()), run.root)
    if args.keep_serving or cfg.loop.keep_serving:
        console.line(f"serving the final policy at http://127.0.0.1:{cfg.serving.port}/v1 (Ctrl-C to stop)")
        while True:
            time.sleep(3600)
    else:
        stop_policy_server(client.app_name)
    return 0


def fault_point(r: int, phase: str) -> None:
    """Fault injection for tests/test_online_loop.py: MPO_ONLINE_KILL_AT="<round>:<phase>" SIGKILLs this driver
    right after the phase's work is done and before its manifest records it, the latest point a crash can hit (a
    phase of a second or less cannot be hit reliably from outside)."""
    if os.environ.get("MPO_ONLINE_KILL_AT") == f"{r}:{phase}":
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def publish_policy(client, version: int, policy_dir, ship: bool) -> dict:
    """Every replica serves `version`: published as its directory, or without shared storage as its safetensors
    bytes (a resumed driver's repeat of its last publish is a no-op either way: serving/weight_sync.py)."""
    if not ship:
        return client.publish(version, str(policy_dir))
    from mpo_online.run.shipping import weights_bytes
    return client.publish(version, weights_bytes=weights_bytes(policy_dir))


EVAL_CHUNKS = 8  # held-out requests go out in this many concurrent calls, so the console can count finished ones


def rollout_kwargs(cfg) -> dict:
    ro, pa = cfg.rollout, cfg.pairs
    # RFT trains on the samples alone: Dropout-NTP continuations (~40% of a round's generation) would go unused
    return dict(samples_per_prompt=ro.samples_per_prompt, temperature=ro.temperature, top_p=ro.top_p,
                max_tokens=ro.max_tokens, prompts_per_round=ro.prompts_per_round, concurrency=ro.concurrency,
                max_pairs_per_prompt=pa.max_pairs_per_prompt, ntp_prefix_ratio=pa.ntp_prefix_ratio,
                dropout_ntp=pa.dropout_ntp and cfg.mpo.objective != "rft", chosen_check=pa.chosen_check,
                cot_instruction=cfg.data.cot_instruction, data_cpus=cfg.resources.data_cpus)


def trainer_kwargs(cfg, seed: int) -> dict:
    t, mpo = cfg.trainer, cfg.mpo
    return dict(delta_mode=mpo.delta_mode, delta_ema_decay=mpo.delta_ema_decay, lr=t.lr, weight_decay=t.weight_decay,
                warmup_ratio=t.warmup_ratio, epochs=t.epochs, micro_batch_size=t.micro_batch_size,
                global_batch_size=t.global_batch_size, zero_stage=t.zero_stage, precision=t.precision,
                max_grad_norm=t.max_grad_norm, max_nonfinite_steps=t.max_nonfinite_steps,
                logps_chunk_size=t.logps_chunk_size, max_length=t.max_length, group_by=t.group_by,
                pref_span=mpo.pref_span, seed=seed)


def shared_paths(cfg, run_root) -> tuple[dict, dict]:
    """(directories written on other nodes, files read there) for mpo_online.run.cluster.check_shared_paths: the run
    directory, and the base checkpoint (its config.json; the directory it will be built or imported into)."""
    from pathlib import Path
    dirs, files, model = {"loop.run_dir": run_root}, {}, Path(cfg.model.path)
    if (model / "config.json").exists():
        files["model.path"] = model / "config.json"
    elif cfg.model.init_if_missing or cfg.model.source:
        dirs["model.path"] = model.parent
    return dirs, files


class TrainCall(NamedTuple):
    path: str       # parquet in the pair schema
    rows: int
    objective: str


def training_calls(cfg, rdir, prompts_by_id: dict) -> list[TrainCall]:
    """What this round trains on, in order: the pairs (preference objectives), or for RFT its correct samples (as
    SFT) that pass the chosen-side check (pairs.chosen_check). With sft.unpaired, a preference round is followed
    by an SFT call on the checked samples of the prompts that gave no pair (all samples right): the chains RFT would
    learn from that the pairs leave out; with sft.paired also the paired prompts' (all RFT would learn from).
    With objective rft, sft.mixed_repeats lists the examples of prompts that also drew a wrong sample that many
    times (the preference objectives' SFT call lists each once: their pairs already train those prompts)."""
    import pyarrow.parquet as pq

    from mpo_online.data.records import pairs_to_table, write_parquet_atomic
    from mpo_online.pairs import rft_examples
    calls = []
    if cfg.mpo.objective != "rft":
        path = rdir / "pairs.parquet"
        calls.append(TrainCall(str(path), pq.read_metadata(path).num_rows, cfg.mpo.objective))
        if not cfg.sft.unpaired:
            return calls
    examples = rft_examples(pq.read_table(rdir / "rollouts.parquet").to_pylist(), prompts_by_id,
                            max_per_prompt=cfg.pairs.max_pairs_per_prompt, cot_instruction=cfg.data.cot_instruction,
                            chosen_check=cfg.pairs.chosen_check,
                            mixed_repeats=cfg.sft.mixed_repeats if cfg.mpo.objective == "rft" else 1)
    if calls and calls[0].rows >= cfg.trainer.global_batch_size and not cfg.sft.paired:
        # (a pair call too small to run is skipped: then its prompts' samples go to the SFT call as well)
        paired = set(pq.read_table(calls[0].path, columns=["prompt_id"]).column("prompt_id").to_pylist())
        examples = [e for e in examples if e.prompt_id not in paired]
    path = rdir / ("rft_examples.parquet" if not calls else "sft_all.parquet" if cfg.sft.paired
                   else "sft_unpaired.parquet")
    write_parquet_atomic(pairs_to_table(examples), path)
    return calls + [TrainCall(str(path), len(examples), "rft")]


def round_train_metrics(results: dict) -> dict:
    """One call's metrics as they are; for two calls (sft.unpaired) the first call's, with the round's totals
    of steps, rows, tokens and seconds, and each call's own metrics under "calls" {objective: metrics}."""
    first = next(iter(results.values()))
    if len(results) == 1:
        return first
    summed = {k: sum(x.get(k) or 0 for x in results.values()) for k in first
              if k in ("steps", "total_steps", "pairs", "tokens", "micro_batches") or k.endswith("_seconds")}
    return {**first, **summed, "calls": results}


def copy_policy(src, dst) -> None:
    """Version r = version r-1's weights (a round without enough data); copied to a temp dir, then renamed."""
    import shutil
    tmp = dst.with_name(dst.name + ".tmp-copy")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    tmp.rename(dst)


if __name__ == "__main__":
    sys.exit(main())
