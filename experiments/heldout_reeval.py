"""Re-evaluate finished runs' policies on a larger held-out set, so that objectives can be told apart.

    python experiments/heldout_reeval.py --n-extra 400 RUN [RUN ...]
    python experiments/heldout_reeval.py --render-only --into README.md --block NAME RUN [RUN ...]

The word-problem runs (jobs/configs/smollm2_*.yaml) evaluate each round on their task directory's 100 held-out
problems: one measurement has a binomial standard error of ~5 points, as wide as the differences between objectives.
This script takes every policy a run saved (`policies/vNNNN`) and scores it greedily as the loop does (the requests
and scoring of mpo_online/evaluate.py, the run's instructions and max_tokens, the chat template applied by vLLM, the
engine options serving/app.py uses on CPU) on those 100 problems plus `--n-extra` new ones: drawn by the same
generator and levels from a derived seed, no question of the train or held-out split repeated. One in-process vLLM
engine (float32) starts on the first policy; each later one is swapped in through the loop's own swap path (the
worker extension's `mpo_reload_from_path`, then the prefix cache reset). Policies with the same weights (a forked
run's v0 is its source's) are scored once: results are cached by the weights' digest in
`<first run's parent>/heldout_reeval_cache.json`, so an interrupted re-evaluation resumes.

Each run gets `heldout_reeval.json`: per policy version, accuracy on all problems, on the original 100 (next to the
accuracy the loop recorded for them: they differ only where vLLM's batch composition changes a greedy token) and on
the new ones. The over-seeds table (grouped as mpo_online/run/results.py groups runs) is printed, or written between
a file's results markers with `--into`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import yaml


def weights_digest(policy: Path) -> str:
    """sha256 over the checkpoint's safetensors files (names and bytes): equal weights, equal digest."""
    h = hashlib.sha256()
    for f in sorted(policy.glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def extended_heldout(data_dir: Path, n_extra: int) -> tuple[list[dict], int]:
    """The task directory's held-out rows, then `n_extra` new ones (no train or held-out question repeated)."""
    import pyarrow.parquet as pq

    from mpo_online.synthetic.tasks import derive_seed
    from mpo_online.synthetic.word_problems import generate_problems

    params = json.loads((data_dir / "tasks.json").read_text())["params"]
    if params.get("family") != "word_problems":
        raise SystemExit(f"{data_dir}: not a word-problem task directory (family {params.get('family')!r})")
    train = pq.read_table(data_dir / "train.parquet").to_pylist()
    heldout = pq.read_table(data_dir / "heldout.parquet").to_pylist()
    extra = generate_problems(n_extra, derive_seed(params["seed"], "heldout-extra"), levels=tuple(params["levels"]),
                              id_prefix="heldout-extra", exclude={r["question"] for r in train + heldout})
    return heldout + extra, len(heldout)


def _eval_settings(run: Path) -> dict:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    d, ro, sv = cfg["data"], cfg["rollout"], cfg["serving"]
    return {"data_dir": d["dir"], "cot_instruction": d["cot_instruction"],
            "direct_instruction": d["direct_instruction"], "max_tokens": ro["max_tokens"],
            "max_model_len": sv["max_model_len"], "max_num_seqs": sv["max_num_seqs"], "kv_cache_gb": sv["kv_cache_gb"]}


def _scores(rows: list[dict], ev_texts: dict, n_orig: int) -> dict:
    """Accuracies over all rows, the original held-out rows and the extra ones, from per-row CoT/direct texts."""
    from mpo_online.evaluate import score_answers

    golds = [r["answer"] for r in rows]
    out = {"n": len(rows), "n_original": n_orig}
    for mode in ("cot", "direct"):
        s = score_answers(golds, ev_texts[mode])
        c = s["correct"]
        out[f"accuracy_{mode}"] = sum(c) / len(c)
        out[f"accuracy_{mode}_original"] = sum(c[:n_orig]) / n_orig
        out[f"accuracy_{mode}_extra"] = sum(c[n_orig:]) / max(1, len(c) - n_orig)
        out[f"format_failure_rate_{mode}"] = s["format_failure_rate"]
    return out


def _commit() -> str:
    import subprocess

    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
    return (git("rev-parse", "--short", "HEAD") or "unknown") + ("+dirty" if git("status", "--porcelain") else "")


def reevaluate(runs: list[Path], n_extra: int) -> None:
    settings = [_eval_settings(r) for r in runs]
    if any(s != settings[0] for s in settings):
        raise SystemExit("the runs were evaluated with different data, instructions or lengths: re-evaluate them apart")
    st = settings[0]
    rows, n_orig = extended_heldout(Path(st["data_dir"]), n_extra)
    cache_path = runs[0].parent / "heldout_reeval_cache.json"
    key = hashlib.sha256(json.dumps([st, n_extra], sort_keys=True).encode()).hexdigest()[:16]
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    cache = cache if cache.get("key") == key else {"key": key, "by_digest": {}}

    import os
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(st["kv_cache_gb"]))))
    from vllm import LLM, SamplingParams

    from mpo_online.evaluate import greedy_request
    from mpo_online.run.machine import describe_machine, machine_line

    llm, commit = None, _commit()   # the code that runs is the code at the start

    def generate(requests: list[dict]) -> list[str]:
        params = [SamplingParams(temperature=0.0, max_tokens=q["max_tokens"]) for q in requests]
        return [o.outputs[0].text for o in llm.chat([q["messages"] for q in requests], params, use_tqdm=False)]

    for run in runs:
        per_version = []
        recorded = {x["round"]: x["eval"] for x in json.loads((run / "summary.json").read_text())["rounds"]}
        for policy in sorted((run / "policies").glob("v[0-9][0-9][0-9][0-9]")):
            version, digest = int(policy.name[1:]), weights_digest(policy)
            if digest not in cache["by_digest"]:
                t = time.time()
                if llm is None:
                    llm = LLM(model=str(policy), enforce_eager=True, max_model_len=st["max_model_len"],
                              max_num_seqs=st["max_num_seqs"], dtype="float32", seed=0,
                              # as serving/app.py builds the loop's engines on CPU
                              enable_chunked_prefill=False, max_num_batched_tokens=max(4096, st["max_model_len"]),
                              worker_extension_cls="serving.weight_sync.WeightSyncExtension")
                else:
                    llm.collective_rpc("mpo_reload_from_path", kwargs={"weights_dir": str(policy)})
                    llm.reset_prefix_cache()
                # CoT and direct answers in one batch, as evaluate() sends them
                reqs = [greedy_request(r["question"] + st["cot_instruction"], [], max_tokens=st["max_tokens"])
                        for r in rows]
                reqs += [greedy_request(r["question"] + st["direct_instruction"], [], max_tokens=st["max_tokens"])
                         for r in rows]
                texts = generate(reqs)
                scores = _scores(rows, {"cot": texts[:len(rows)], "direct": texts[len(rows):]}, n_orig)
                cache["by_digest"][digest] = {**scores, "seconds": time.time() - t,
                                              "first_seen": f"{run}/{policy.name}"}
                cache_path.write_text(json.dumps(cache, indent=1))
            s = cache["by_digest"][digest]
            per_version.append({"version": version, "digest": digest[:16], **s,
                                "recorded_accuracy_cot": (recorded.get(version) or {}).get("accuracy_cot")})
            print(f"{run.name} v{version}: CoT {100 * s['accuracy_cot']:.1f}% of {s['n']} (original "
                  f"{100 * s['accuracy_cot_original']:.0f}%, recorded {per_version[-1]['recorded_accuracy_cot']})",
                  flush=True)
        (run / "heldout_reeval.json").write_text(json.dumps(
            {"n_extra": n_extra, "settings": st, "machine": machine_line(describe_machine()), "commit": commit,
             "date": time.strftime("%Y-%m-%d"), "versions": per_version}, indent=1))


def table(runs: list[Path], command: str = "") -> str:
    """Over-seeds table of the re-evaluated accuracies, grouped as results.py groups runs; minutes per round are the
    loop's own (from summary.json), format failures the re-evaluation's."""
    from mpo_online.run.results import group_cells, run_row

    rows = []
    for run in runs:
        rr = run_row(run)
        re = json.loads((run / "heldout_reeval.json").read_text())
        rr["cot_values"] = [v["accuracy_cot"] for v in re["versions"]]
        rr["format_values"] = [v["format_failure_rate_cot"] for v in re["versions"]]
        rr["orig_diff"] = max(abs(v["accuracy_cot_original"] - v["recorded_accuracy_cot"]) for v in re["versions"]
                              if v["recorded_accuracy_cot"] is not None)
        rr["n"], rr["stamp"] = re["versions"][0]["n"], f"`{re['commit']}`, {re['date']}, {re['machine']}"
        rows.append(rr)
    n = rows[0]["n"]
    out = [f"Held-out greedy CoT accuracy on {n} problems (the runs' {rows[0]['n_heldout']} and "
           f"{n - int(rows[0]['n_heldout'])} new ones, same generator and levels) by policy version, mean ± standard "
           "error over seeds; format failures of the last version; the loop's minutes per round; and the largest "
           "difference, on the runs' own problems, between this re-evaluation and the accuracy the loop recorded:", "",
           "| objective | runs (seed) | CoT acc by round (0 = start) | gain | gain per seed | format fail (last) | "
           "minutes per round (mean) | vs recorded |",
           "|---|---|---|---:|---|---:|---|---:|"]
    for c in group_cells(rows):
        out.append(f"| {c['objective']} | {c['seeds']} | {c['cot']} | {c['gain']} | "
                   f"{', '.join(f'{100 * g:+.1f}' for g in c['gains'])} | {c['fail']} | {c['minutes']} | "
                   f"{100 * max(x['orig_diff'] for x in c['runs']):.0f} pts |")
    out += ["", f"Rendered by `python experiments/heldout_reeval.py --render-only {command}"
            f"{' '.join(str(r) for r in runs)}`; each run's command: [docs/results.md](docs/results.md). Runs at "
            + ", ".join(dict.fromkeys(f"`{x['commit']}`" for x in rows)) + " on "
            + "; ".join(dict.fromkeys(x["machine"] for x in rows)) + "; re-evaluated at "
            + "; ".join(dict.fromkeys(x["stamp"] for x in rows)) + "."]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    from mpo_online.run.results import add_into_args, write_or_print

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--n-extra", type=int, default=400)
    p.add_argument("--render-only", action="store_true", help="do not evaluate: render from heldout_reeval.json files")
    add_into_args(p)
    a = p.parse_args(argv)
    if not a.render_only:
        reevaluate(a.runs, a.n_extra)
    write_or_print(lambda options: table(a.runs, options), a.into, a.block)


if __name__ == "__main__":
    main()
