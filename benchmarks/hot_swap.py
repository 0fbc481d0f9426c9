"""Benchmark: versioned weight hot-swap of a ~114M-parameter policy (435 MB fp32) across Serve replicas.

Measures, on a running app (2 replicas by default, tiny Idefics3 architecture scaled to hidden 768 x 12 layers):
  1. quiet swaps: time from `publish(v)` to every replica reporting v (publish returns), and to every replica
     *answering* with v (probed through the handle); effective GB/s = checkpoint bytes / that time (replicas
     reload in parallel, so this is the per-replica rate; x replicas for the aggregate); the replicas' own
     drain+reload+cache-reset time from the registry;
  2. one swap through the bytes path (safetensors bytes -> object store -> replicas), as used across nodes;
  3. swaps under load: client threads (HTTP via the openai client and rollouts via handles) run through repeated
     publishes; counts failed requests (target 0), responses per version, and checks every response's greedy text
     equals what its reported version produces (references taken while quiet), i.e. no mixed or stale weights.

Usage:
  python benchmarks/hot_swap.py                      # 2 replicas, 6 quiet swaps, 6 swaps under load
  python benchmarks/hot_swap.py --swaps 3 --replicas 1
Targets: >= 1 GB/s effective (stretch 2), 0 failed requests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CHAT = [{"role": "user", "content": "Describe the picture."}]
GREEDY = {"messages": CHAT, "temperature": 0.0, "max_tokens": 8}


def build_models(root: Path) -> list[str]:
    from mpo_online.synthetic.tiny_model import build_model_dir

    dirs = []
    for seed in (0, 1):
        d = root / f"big{seed}"
        if not (d / "model.safetensors").exists():
            build_model_dir(d, seed=seed, hidden=768, layers=12, heads=12, intermediate=3072)
        dirs.append(str(d))
    return dirs


def per_replica(client, replicas: int, want_version: int | None = None, deadline_s: float = 120.0):
    """replica id -> (version, text) once every replica answered (with `want_version`, if given)."""
    seen: dict[str, tuple[int, str]] = {}
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < deadline_s:
        for r in client.generate([GREEDY] * (4 * replicas), chunks=4 * replicas):
            assert r["error"] is None, r["error"]
            if want_version is None or r["version"] >= want_version:
                seen[r["replica"]] = (r["version"], r["outputs"][0]["text"])
        if len(seen) >= replicas:
            return seen
    raise TimeoutError(f"only {len(seen)} of {replicas} replicas answered with v{want_version}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--swaps", type=int, default=6)
    ap.add_argument("--clients", type=int, default=3, help="HTTP client threads under load (plus 1 handle thread)")
    ap.add_argument("--models-dir", default=None, help="where to build/reuse the two checkpoints (default: temp)")
    ap.add_argument("--port", type=int, default=8312)
    ap.add_argument("--cores-per-replica", type=int, default=1,
                    help="pin each replica's engine to its own cores (0: vLLM's auto binding, all on the same cores)")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import openai
    import ray
    from ray import serve

    from serving.app import start_policy_server, stop_policy_server

    tmp = tempfile.TemporaryDirectory()
    dirs = build_models(Path(args.models_dir or tmp.name))
    nbytes = sum(p.stat().st_size for p in Path(dirs[0]).glob("*.safetensors"))
    params = json.loads((Path(dirs[0]) / "mpo_online_model.json").read_text())["parameters"]
    print(f"model: {params / 1e6:.1f}M parameters, {nbytes / 1e6:.0f} MB safetensors; {args.replicas} replicas",
          flush=True)

    ray.init(address="local", num_cpus=2 * args.replicas + 2, include_dashboard=False, log_to_driver=False)
    result: dict = {"parameters": params, "bytes": nbytes, "replicas": args.replicas}
    try:
        client = start_policy_server(dirs[0], replicas=args.replicas, port=args.port, dtype="float32",
                                     max_model_len=512, max_num_seqs=64, kv_cache_gb=1,
                                     cpu_cores_per_replica=args.cores_per_replica or None)
        weights_of = {0: 0}  # version -> index into dirs
        refs = {0: next(iter(per_replica(client, args.replicas).values()))[1]}

        # ---- 1. quiet swaps
        quiet = []
        for v in range(1, args.swaps + 1):
            t0 = time.perf_counter()
            out = client.publish(v, dirs[v % 2])
            t_live = time.perf_counter() - t0
            answers = per_replica(client, args.replicas, want_version=v)
            t_answer = time.perf_counter() - t0
            weights_of[v] = v % 2
            texts = {t for _, t in answers.values()}
            assert len(texts) == 1, answers
            refs.setdefault(v % 2, texts.pop())
            swap_s = max(s.get("swap_s", float("nan")) for s in out["replicas"].values())
            reload_s = max(s.get("reload_s", float("nan")) for s in out["replicas"].values())
            quiet.append({"live_s": t_live, "answer_s": t_answer, "replica_swap_s": swap_s, "reload_s": reload_s})
            print(f"  v{v}: all replicas report v{v} after {t_live:.3f} s, all answer with it after {t_answer:.3f} s "
                  f"(slowest replica: swap {swap_s:.3f} s of which vLLM reload {reload_s:.3f} s) -> "
                  f"{nbytes / t_live / 1e9:.2f} GB/s per replica, "
                  f"{nbytes * args.replicas / t_live / 1e9:.2f} GB/s aggregate", flush=True)
        assert refs[0] != refs[1], "the two checkpoints answer identically; cannot tell versions apart"
        med_live = statistics.median(q["live_s"] for q in quiet)
        med_answer = statistics.median(q["answer_s"] for q in quiet)
        med_swap = statistics.median(q["replica_swap_s"] for q in quiet)
        med_reload = statistics.median(q["reload_s"] for q in quiet)
        result["quiet"] = {"median_publish_to_live_s": med_live, "median_publish_to_answer_s": med_answer,
                           "median_replica_swap_s": med_swap, "median_vllm_reload_s": med_reload,
                           "gb_s_per_replica": nbytes / med_live / 1e9,
                           "gb_s_aggregate": nbytes * args.replicas / med_live / 1e9}

        # ---- 2. bytes path
        v = args.swaps + 1
        blob = b"".join(p.read_bytes() for p in Path(dirs[v % 2]).glob("*.safetensors"))
        t0 = time.perf_counter()
        client.publish(v, weights_bytes=blob)
        t_bytes = time.perf_counter() - t0
        weights_of[v] = v % 2
        assert {t for _, t in per_replica(client, args.replicas, want_version=v).values()} == {refs[v % 2]}
        result["bytes_path"] = {"publish_to_live_s": t_bytes, "gb_s_per_replica": nbytes / t_bytes / 1e9}
        print(f"  v{v} as bytes: live after {t_bytes:.3f} s ({nbytes / t_bytes / 1e9:.2f} GB/s per replica)",
              flush=True)
        del blob

        # ---- 3. swaps under load
        import logging

        logging.getLogger("httpx").setLevel(logging.WARNING)  # Ray's logging setup re-enabled its INFO lines
        oc = openai.OpenAI(base_url=client.base_url, api_key="unused", max_retries=0, timeout=300)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        stop = threading.Event()
        lock = threading.Lock()
        seen: list[tuple[int, str, float]] = []
        failures: list[str] = []

        def http_loop():
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = oc.chat.completions.create(model="policy", messages=CHAT, temperature=0, max_tokens=8)
                    with lock:
                        seen.append((int(r.model.split("@v")[1]), r.choices[0].message.content,
                                     time.perf_counter() - t0))
                except Exception as exc:
                    with lock:
                        failures.append(repr(exc))

        def handle_loop():
            while not stop.is_set():
                t0 = time.perf_counter()
                out = client.generate([GREEDY] * 4)
                with lock:
                    for r in out:
                        if r["error"]:
                            failures.append(r["error"])
                        else:
                            seen.append((r["version"], r["outputs"][0]["text"], time.perf_counter() - t0))

        threads = [threading.Thread(target=http_loop) for _ in range(args.clients)]
        threads.append(threading.Thread(target=handle_loop))
        for t in threads:
            t.start()
        loaded = []
        try:
            time.sleep(2.0)
            for v in range(args.swaps + 2, 2 * args.swaps + 2):
                t0 = time.perf_counter()
                client.publish(v, dirs[v % 2])
                loaded.append(time.perf_counter() - t0)
                weights_of[v] = v % 2
                time.sleep(1.0)
            time.sleep(1.0)
        finally:
            stop.set()
            for t in threads:
                t.join(300)
        per_version: dict[int, int] = {}
        wrong = 0
        for version, text, _ in seen:
            per_version[version] = per_version.get(version, 0) + 1
            wrong += text != refs[weights_of[version]]
        lat = sorted(s for _, _, s in seen)
        result["under_load"] = {"responses": len(seen), "failed": len(failures), "wrong_text_for_version": wrong,
                                "responses_per_version": per_version,
                                "median_publish_to_live_s": statistics.median(loaded),
                                "latency_p50_s": lat[len(lat) // 2], "latency_max_s": lat[-1]}
        print(f"  under load ({args.clients} HTTP clients + 1 handle client, {args.swaps} swaps): "
              f"{len(seen)} responses, {len(failures)} failed, {wrong} with text not matching their version; "
              f"per version {dict(sorted(per_version.items()))}; publish->live median "
              f"{statistics.median(loaded):.3f} s; request latency p50 {lat[len(lat) // 2]:.3f} s, max {lat[-1]:.3f} s")
        if failures:
            print("  first failures:", failures[:3])
    finally:
        try:
            stop_policy_server()
        finally:
            serve.shutdown()
            ray.shutdown()
            tmp.cleanup()
    q = result["quiet"]
    print(f"\nquiet swap (median): publish -> every replica live {q['median_publish_to_live_s']:.3f} s "
          f"(replica swap {q['median_replica_swap_s']:.3f} s, of which vLLM reload_weights "
          f"{q['median_vllm_reload_s']:.3f} s), -> answering {q['median_publish_to_answer_s']:.3f} s; "
          f"{q['gb_s_per_replica']:.2f} GB/s per replica, {q['gb_s_aggregate']:.2f} GB/s aggregate "
          f"(target >= 1, stretch 2)")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
