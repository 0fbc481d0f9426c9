"""Benchmark: where rollout time goes. Generated tokens/s of the loop's rollout path against raw vLLM, side by side.

On one machine, in one run, on the same prompts (a config's training tasks, images included) and the same sampling
(the config's samples per prompt, temperature, top-p, max tokens; per-prompt seeds; the sampled token's log-prob
returned, as a round asks for):

  round     `run_round` exactly as the recipe calls it (Ray Data tasks -> PolicyClient -> Serve replica -> engine)
  handle    one `PolicyClient.generate` call with all of the round's requests: Serve without Ray Data
  raw       `vllm.LLM.chat` in one process with the same engine settings and cores (the offline limit)
  raw-text  the same engine on text-only prompts of the same token lengths (the image's tokens replaced by text)
  bound     the model's FLOPs per generated token against the cores' measured fp32 matmul rate (an upper bound)

The raw engine lives in a child process (this file with --raw-worker) and the Serve app in this driver for the whole
run; the paths alternate within each repetition so that load from anything else on the machine (steal time on a
shared VM is common here) hits all of them alike. Reported: the median over repetitions of each path's tokens/s,
and the median of per-repetition ratios round / best raw. The machine (CPU model, vector flags) is printed first.

Usage:
  python benchmarks/rollout_path.py --model runs/x/policies/v0000            # the demo config, 256 prompts, 2 reps
  python benchmarks/rollout_path.py --config jobs/configs/learning_curve.yaml --model DIR --prompts 512
Targets (issue 27): round >= 3x the rollout rate of the demo before this benchmark, and >= 1/1.2 of the best raw.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _rows(data_dir: str, prompts: int) -> list[dict]:
    from mpo_online.data.prompts import load_prompts

    rows, _ = load_prompts(os.path.join(data_dir, "train.parquet"))
    # Prompts with a gold answer only: open prompts add Dropout-NTP continuations, which the raw paths do not have
    return [r for r in rows if r["answer"] is not None][:prompts]


def _requests(rows: list[dict], sampling: dict, seed: int) -> list[dict]:
    """The round's requests, as the rollout stage builds them (round 1's seeds)."""
    from mpo_online.rollout.pipeline import rollout_request

    return [rollout_request(r, **sampling, seed=seed, round=1) for r in rows]


# ----------------------------------------------------------------------------------------------- raw vLLM (child)

def raw_worker(spec_path: str) -> None:
    """Child process: one offline vLLM engine (the replica's engine settings); serves "run image|text" lines."""
    from vllm import LLM, SamplingParams

    spec = json.load(open(spec_path))
    llm = LLM(model=spec["model"], enforce_eager=True, max_model_len=spec["max_model_len"], dtype="float32",
              max_num_seqs=spec["max_num_seqs"], max_num_batched_tokens=max(4096, spec["max_model_len"]),
              enable_chunked_prefill=False, disable_log_stats=True, limit_mm_per_prompt={"image": 1})
    reqs = spec["requests"]
    params = [SamplingParams(n=q["n"], temperature=q["temperature"], top_p=q["top_p"], max_tokens=q["max_tokens"],
                             seed=q["seed"], logprobs=0) for q in reqs]
    image_msgs = [q["messages"] for q in reqs]
    # Text-only prompts as long as the image prompts: the question repeated until the templated prompt has as many
    # tokens as the engine's image prompt (its image tokens included).
    lengths = [len(o.prompt_token_ids) for o in llm.chat(image_msgs, [SamplingParams(max_tokens=1)] * len(reqs),
                                                        use_tqdm=False)]
    tok = llm.get_tokenizer()
    text_msgs = []
    for q, want in zip(reqs, lengths):
        question = "".join(p["text"] for p in q["messages"][0]["content"] if p["type"] == "text")
        text = question
        while True:
            msgs = [{"role": "user", "content": [{"type": "text", "text": text}]}]
            ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                             add_special_tokens=False)
            if len(ids) >= want or len(text) > 8 * want:
                break
            text += " " + question
        text_msgs.append(msgs)

    def run(kind: str) -> int:
        outs = llm.chat(image_msgs if kind == "image" else text_msgs, params, use_tqdm=False)
        return sum(len(o.token_ids) for r in outs for o in r.outputs)

    run("image"), run("text")  # warm-up (first-call compilation of the sampler's paths)
    print("READY", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] != "run":
            break
        t0 = time.perf_counter()
        tokens = run(cmd[1])
        print(f"DONE {tokens} {time.perf_counter() - t0}", flush=True)


class RawEngine:
    """Driver side of raw_worker: a subprocess kept alive so that the paths can alternate."""

    def __init__(self, spec: dict, cores: int | None, kv_cache_gb: float):
        self.spec_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        json.dump(spec, self.spec_file)
        self.spec_file.close()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(kv_cache_gb))))  # as serving.app sets it
        if cores:  # the cores the replica's engine is pinned to (serving.server._bind_cores, replica 0)
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(i) for i in range(cores))
        self.log = open(self.spec_file.name + ".log", "w")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--raw-worker", self.spec_file.name],
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._expect("READY")

    def _expect(self, word: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(word):
                return line
        raise RuntimeError(f"raw vLLM worker exited (code {self.proc.wait()}) before {word}; its log: "
                           f"{self.spec_file.name}.log")

    def run(self, kind: str) -> tuple[int, float]:
        self.proc.stdin.write(f"run {kind}\n")
        self.proc.stdin.flush()
        _, tokens, seconds = self._expect("DONE").split()
        return int(tokens), float(seconds)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(120)
        self.log.close()
        for path in (self.spec_file.name, self.spec_file.name + ".log"):
            os.unlink(path)


# ----------------------------------------------------------------------------------------------- FLOPs bound

def flops_bound(model_dir: str, mean_context: float, cores: int) -> dict:
    """Decode FLOPs per generated token (2 x the text model's matmul weights incl. the output layer + attention
    over the mean context) against the best fp32 matmul rate torch reaches on `cores` threads here."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    text = getattr(cfg, "text_config", cfg)
    weights = embed = 0
    names = set()
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):  # one file or shards
        with safe_open(path, "pt") as f:
            for name in f.keys():
                names.add(name)
                shape = f.get_slice(name).get_shape()
                numel = 1
                for d in shape:
                    numel *= d
                if "vision" in name or "connector" in name or numel == 0:
                    continue
                if "embed_tokens" in name:
                    embed = numel
                elif name.endswith("weight") and len(shape) == 2:
                    weights += numel
    if "lm_head.weight" not in names:
        weights += embed  # a tied output layer is the embedding matrix used once more per token
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    # per layer and context position: q.k and p.v, 2 FLOPs per multiply-add, over all query heads
    attn = 4 * text.num_hidden_layers * text.num_attention_heads * head_dim
    per_token = 2 * weights + attn * mean_context
    threads = torch.get_num_threads()
    torch.set_num_threads(cores)
    best = 0.0
    for n in (256, 512, 1024):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        t0, reps = time.perf_counter(), 0
        while time.perf_counter() - t0 < 0.5:
            a @ b
            reps += 1
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    torch.set_num_threads(threads)
    return {"flops_per_token": per_token, "matmul_flops_per_s": best, "tok_s": best / per_token}


# ----------------------------------------------------------------------------------------------- driver

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=os.path.join(REPO, "jobs/configs/tiny_cpu.yaml"))
    ap.add_argument("--model", default=None, help="policy dir (default: the config's model.path, built if missing)")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--port", type=int, default=8311)
    ap.add_argument("--raw-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides (rollout.temperature=0.5 ...)")
    args = ap.parse_args()
    if args.raw_worker:
        return raw_worker(args.raw_worker)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray
    from ray import serve

    from jobs.online_mpo import rollout_kwargs
    from mpo_online.config import load_config
    from mpo_online.data.prompts import to_ray_dataset
    from mpo_online.rollout.pipeline import run_round
    from mpo_online.run.machine import machine_line
    from mpo_online.warm_start import ensure_model, ensure_tasks
    from serving.app import serving_kwargs, start_policy_server, stop_policy_server

    cfg = load_config(args.config, args.overrides)
    model = args.model or str(ensure_model(cfg.model.path, init_if_missing=cfg.model.init_if_missing,
                                           text_only=cfg.model.text_only, seed=cfg.model.seed,
                                           source=cfg.model.source))
    d = cfg.data
    data = ensure_tasks(d.dir, generate_if_missing=d.generate_if_missing, n_train=d.n_train, n_heldout=d.n_heldout,
                        seed=d.seed, levels=d.levels, max_count=d.max_count, open_fraction=d.open_fraction,
                        task=d.task)
    rows = _rows(str(data), args.prompts)
    ro = cfg.rollout
    sampling = {"n": ro.samples_per_prompt, "temperature": ro.temperature, "top_p": ro.top_p,
                "max_tokens": ro.max_tokens}
    requests = _requests(rows, sampling, ro.seed)
    cores = cfg.serving.cpu_cores_per_replica
    print(f"{machine_line()}\nmodel {model}, {len(rows)} prompts of {data} x n={ro.samples_per_prompt}, "
          f"T {ro.temperature}, max_tokens {ro.max_tokens}, engine cores {cores or 'auto'}; {args.reps} reps of "
          "raw / raw-text / handle / round, alternating", flush=True)

    raw = RawEngine({"model": model, "requests": requests, "max_model_len": cfg.serving.max_model_len,
                     "max_num_seqs": cfg.serving.max_num_seqs}, cores, cfg.serving.kv_cache_gb)
    ray.init(address="local", num_cpus=cfg.resources.num_cpus, include_dashboard=False, log_to_driver=False)
    tmp = tempfile.TemporaryDirectory()
    try:
        options = serving_kwargs(cfg.serving, cfg.resources)
        options["port"] = args.port
        client = start_policy_server(model, dtype=cfg.model.dtype, **options)
        ds = to_ray_dataset(rows)
        ids = [r["id"] for r in rows]
        kwargs = {**rollout_kwargs(cfg), "prompts_per_round": len(rows)}

        lengths = []  # (prompt tokens, generated tokens) per sample: the mean context of a decode step

        def handle() -> tuple[int, float]:
            t0 = time.perf_counter()
            out = client.generate(requests)
            seconds = time.perf_counter() - t0
            bad = [r["error"] for r in out if r["error"]]
            assert not bad, bad[:3]
            lengths[:] = [(r["prompt_tokens"], o["n_tokens"]) for r in out for o in r["outputs"]]
            return sum(o["n_tokens"] for r in out for o in r["outputs"]), seconds

        def round_(i: int) -> tuple[int, float]:
            t0 = time.perf_counter()
            st = run_round(ds, client=client, round=1, policy_version=0, out_dir=os.path.join(tmp.name, str(i)),
                           policy_dir=model, seed=ro.seed, prompt_ids=ids, **kwargs)
            return st.tokens_generated, time.perf_counter() - t0

        handle(), round_(-1)  # warm-up
        reps = []
        for i in range(args.reps):
            rep = {"raw": raw.run("image"), "raw-text": raw.run("text"), "handle": handle(), "round": round_(i)}
            reps.append(rep)
            print(f"  rep {i}: " + ", ".join(f"{k} {t / s:6.0f} tok/s ({t} tok, {s:.1f} s)"
                                             for k, (t, s) in rep.items()), flush=True)
    finally:
        raw.close()
        try:
            stop_policy_server()
        finally:
            serve.shutdown()
            ray.shutdown()
            tmp.cleanup()

    def med(key: str) -> float:
        return statistics.median(t / s for r in reps for t, s in [r[key]])

    ratio = statistics.median((r["round"][0] / r["round"][1]) / max(t / s for k in ("raw", "raw-text")
                                                                    for t, s in [r[k]]) for r in reps)
    context = sum(p * g + g * g / 2 for p, g in lengths) / max(sum(g for _, g in lengths), 1)  # token-weighted
    bound = flops_bound(model, mean_context=context, cores=cores or 1)
    print(f"\nmedian generated tok/s: round {med('round'):.0f}, handle {med('handle'):.0f}, raw {med('raw'):.0f}, "
          f"raw-text {med('raw-text'):.0f}; FLOPs bound {bound['tok_s']:.0f} "
          f"({bound['flops_per_token'] / 1e6:.1f} MFLOP/token at {bound['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s)")
    print(f"round / best raw (median of per-rep ratios): {ratio:.2f} (target >= {1 / 1.2:.2f})")
    print("RESULT " + json.dumps({"round_tok_s": med("round"), "handle_tok_s": med("handle"), "raw_tok_s": med("raw"),
                                  "raw_text_tok_s": med("raw-text"), "round_over_best_raw": ratio,
                                  "flops_bound_tok_s": bound["tok_s"], "machine": machine_line()}))


if __name__ == "__main__":
    main()
