"""Benchmark: what grouping a training call's micro-batch ticks saves (mpo_online/trainer/ordering.py), side by side.

Builds the tiny default policy and the warm start's demonstrations (image chains, direct answers, image-free text
drills; the tiny config's mix) from a small synthetic task split, lays them out with `length_grouped_shards` for two
workers x micro-batch 16 under each `trainer.group_by` (none, images, length), and for each prints:

    padding %        padded positions that are padding, over every tick of the layout (collation only)
    ms/row fwd+bwd   forward + backward of the policy, per row, over the first --ticks ticks, a tick costing its
                     slower worker's micro-batch (the workers wait for each other at the all-reduce); one process,
                     one torch thread, the two workers' micro-batches run one after the other
    x none           that time over group_by none's, measured in the same run

Usage (from the repo root; no Ray): .venv/bin/python benchmarks/batch_grouping.py [--ticks 15] [--n-train 1600]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ticks", type=int, default=15, help="ticks timed per grouping")
    p.add_argument("--n-train", type=int, default=1600, help="tasks; 60%% image demonstrations, 40%% text drills")
    a = p.parse_args()

    import torch

    from mpo_online.config import load_config
    from mpo_online.data.prompts import load_prompts
    from mpo_online.data.records import pairs_to_table
    from mpo_online.synthetic.tasks import write_task_splits
    from mpo_online.synthetic.tiny_model import build_model_dir
    from mpo_online.trainer.batching import PairCollator
    from mpo_online.trainer.logps import PolicyLogps, load_model
    from mpo_online.trainer.ordering import GROUP_BY, length_grouped_shards
    from mpo_online.warm_start import warm_start_data

    torch.set_num_threads(1)
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "tiny_cpu.yaml"), [])
    d, ws = cfg.data, cfg.warm_start
    tmp = tempfile.mkdtemp(prefix="mpo-grouping-")
    model_dir = build_model_dir(os.path.join(tmp, "model"), seed=0)
    write_task_splits(os.path.join(tmp, "tasks"), n_train=a.n_train, n_heldout=8, seed=0, levels=tuple(d.levels),
                      max_count=d.max_count, open_fraction=d.open_fraction)
    tasks = load_prompts(os.path.join(tmp, "tasks", "train.parquet"))[0]
    rows = pairs_to_table(warm_start_data(
        tasks, examples=int(a.n_train * 0.6), text_drills=a.n_train - int(a.n_train * 0.6),
        cot_instruction=d.cot_instruction, direct_instruction=d.direct_instruction,
        direct_fraction=ws.direct_fraction, glance_fraction=ws.glance_fraction, seed=0)).to_pylist()
    collate = PairCollator.from_pretrained(model_dir, pairs=False)
    policy = PolicyLogps(load_model(model_dir))
    mb, world = ws.micro_batch_size, 2

    results = {}
    for group_by in GROUP_BY[::-1]:   # none first: the baseline
        shards = length_grouped_shards(rows, world=world, micro_batch_size=mb, seed=0, group_by=group_by)
        n_ticks = len(shards[0]) // mb
        real = padded = 0
        for s in shards:
            for k in range(n_ticks):
                t = collate(s[k * mb:(k + 1) * mb]).tensors
                real += int(t["attention_mask"].sum())
                padded += t["input_ids"].numel()
        seconds = 0.0
        for k in range(min(a.ticks, n_ticks)):
            per_worker = []
            for s in shards:
                batch = collate(s[k * mb:(k + 1) * mb]).tensors
                t0 = time.perf_counter()
                sum_lp, _, _ = policy(batch)
                sum_lp.sum().backward()
                per_worker.append(time.perf_counter() - t0)
            seconds += max(per_worker)
        results[group_by] = (1 - real / padded, seconds / (min(a.ticks, n_ticks) * mb * world) * 1000)

    print(f"{len(rows)} demonstrations, {world} workers x micro-batch {mb}, {a.ticks} ticks timed per grouping")
    print(f"{'group_by':>9} {'padding %':>10} {'ms/row fwd+bwd':>15} {'x none':>7}")
    for group_by, (pad, ms) in results.items():
        print(f"{group_by:>9} {pad * 100:10.1f} {ms:15.2f} {ms / results['none'][1]:7.2f}")


if __name__ == "__main__":
    main()
