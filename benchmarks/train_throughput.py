"""Benchmark: training throughput of `mpo_online.trainer.train_policy` on the tiny default policy, 1 vs 2 workers.

Builds the tiny Idefics3 policy and N synthetic MPO pairs (the task generator's 64x64 grid images and questions,
chosen/rejected responses of ~70-90 characters, like the tiny config's CoT rollouts), then runs one full
`train_policy` call per worker count with the tiny config's trainer settings (micro-batch 8, global batch 32,
ZeRO-0, fp32, lr 2e-4) and prints the calls side by side:

    tokens/s per worker   training tokens (prompt + image + response, chosen + rejected) / step time / workers
    ref tokens/s/worker   the one-off reference log-prob pass (forward only; includes loading the reference)
    startup / init / ref / setup / steps / teardown / call   where the seconds of one call go (startup: Ray Train
    controller + worker group until the train function starts; init: imports + processor in the workers; setup:
    policy load + deepspeed.initialize; teardown: export + final report + shutdown)

Usage (from the repo root; starts its own Ray with 4 logical CPUs, like the tiny config):
    .venv/bin/python benchmarks/train_throughput.py                 # 200 pairs, workers 1 and 2 (~3 min here)
    .venv/bin/python benchmarks/train_throughput.py --pairs 64 --workers 2
Each worker gets --worker-cpus logical CPUs (default 1 -> one torch thread per worker), so "2 workers" uses both
cores of this machine and "1 worker" one of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_pairs(n: int, seed: int = 0):
    """n PreferencePairs over generated tasks: a correct and a wrong CoT-style answer per prompt."""
    from mpo_online.data.records import PreferencePair
    from mpo_online.synthetic.tasks import generate_tasks

    tasks = [t for t in generate_tasks(2 * n, seed) if t["answer"] is not None][:n]
    pairs = []
    for t in tasks:
        gold, wrong = t["answer"], str(int(t["answer"]) + 1)
        chosen = f"I count the shapes in each row and add them up. Final answer: {gold}"
        rejected = f"Looking at the picture, the number I get is this one. Final answer: {wrong}"
        pairs.append(PreferencePair(pair_id=t["id"], prompt_id=t["id"], kind="correctness", question=t["question"],
                                    images=t["images"], chosen=chosen, rejected=rejected, gold_answer=gold))
    return pairs


def run_one(pairs_path, policy_dir, out_root, *, workers, worker_cpus, args) -> dict:
    from mpo_online.trainer import train_policy
    t0 = time.time()
    r = train_policy(pairs_path, policy_dir=policy_dir, out_dir=os.path.join(out_root, f"policy_w{workers}"),
                     objective="mpo", lr=2e-4, weight_decay=0.05, warmup_ratio=0.05,
                     micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                     zero_stage=args.zero_stage, max_length=512, num_workers=workers, worker_cpus=worker_cpus)
    m = r.metrics
    return {"workers": workers, "steps": m["steps"], "tokens": m["tokens"],
            "tok/s/worker": m["tokens_per_s_per_worker"], "tok/s total": m["tokens_per_s"],
            "ref tok/s/worker": m["ref_tokens_per_s_per_worker"], "startup s": m["startup_seconds"],
            "init s": m["init_seconds"], "ref s": m["ref_seconds"], "setup s": m["setup_seconds"],
            "steps s": m["train_seconds"],
            "teardown s": m["teardown_seconds"], "fit s": m["fit_seconds"], "prep s": m["prep_seconds"],
            "call s": time.time() - t0, "reward_acc": m["reward_accuracy"], "loss": m["loss"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--worker-cpus", type=float, default=1.0)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, default=32)
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)

    import ray

    from mpo_online.data.records import pairs_to_table, write_parquet_atomic
    from mpo_online.synthetic.tiny_model import build_model_dir

    tmp = tempfile.mkdtemp(prefix="mpo-train-bench-")
    policy = str(build_model_dir(os.path.join(tmp, "tiny_vlm")))
    pairs_path = os.path.join(tmp, "pairs.parquet")
    write_parquet_atomic(pairs_to_table(make_pairs(args.pairs)), pairs_path)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows = []
    for w in [int(x) for x in args.workers.split(",")]:
        rows.append(run_one(pairs_path, policy, tmp, workers=w, worker_cpus=args.worker_cpus, args=args))
        print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()

    keys = list(rows[0])
    print(f"\n{args.pairs} pairs, micro {args.micro_batch_size}, global {args.global_batch_size}, "
          f"ZeRO-{args.zero_stage}, fp32, {args.worker_cpus:g} CPU/worker, {os.cpu_count()} cores")
    print(f"{'':>18}" + "".join(f"{r['workers']:>10} w" for r in rows))
    for k in keys[1:]:
        print(f"{k:>18}" + "".join(f"{r[k]:>12.1f}" if isinstance(r[k], float) else f"{r[k]:>12}" for r in rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
