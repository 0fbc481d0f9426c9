"""Held-out evaluation: greedy accuracy in CoT and direct-answer mode, format failures, image dependence.

One scorer, two ways to generate:
- `offline_generator(model_dir)`: an in-process vLLM engine (`mpo-online eval --model DIR --data DIR`, warm start).
- a `PolicyClient` from serving.client: the loop evaluates the *served* policy through deployment handles.
Both are wrapped as `generate(requests) -> list[str]`, where a request is an OpenAI-style `messages` list plus sampling
fields (the format `PolicyClient.generate` takes). Model output is only ever parsed, never executed.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from mpo_online.data.records import openai_messages
from mpo_online.reward.verify import answers_match, extract_final_answer

Generate = Callable[[list[dict]], list[str]]


def greedy_request(question: str, images: list[bytes], *, with_images: bool = True, max_tokens: int = 96) -> dict:
    return {"messages": openai_messages(question, images, with_images=with_images),
            "n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": max_tokens, "seed": 0}


def score_answers(golds: list[str], texts: list[str]) -> dict:
    """Accuracy and format-failure rate of generated texts against gold answers."""
    answers = [extract_final_answer(t) for t in texts]
    correct = [a is not None and answers_match(a, g) for a, g in zip(answers, golds)]
    n = max(len(golds), 1)
    return {"accuracy": sum(correct) / n, "format_failure_rate": sum(a is None for a in answers) / n,
            "n": len(golds), "correct": correct}


def image_dependence(with_image: list[str], without_image: list[str]) -> float:
    """Mean dissimilarity (1 - difflib ratio) of greedy answers with and without the image: 0 = the image is ignored."""
    if not with_image:
        return 0.0
    ratios = [difflib.SequenceMatcher(None, a, b).ratio() for a, b in zip(with_image, without_image)]
    return 1.0 - sum(ratios) / len(ratios)


def chain_rates(rows: list[dict], texts: list[str], correct: list[bool]) -> dict:
    """For synthetic tasks (meta with `cells`): how often CoT chains scan, hold together and read the image right,
    and accuracy per task level. {} for other prompts."""
    import json

    from mpo_online.synthetic.chains import check_task_chain
    checks, levels = [], {}
    for r, t, ok in zip(rows, texts, correct):
        meta = json.loads(r.get("meta") or "{}")
        if "cells" not in meta or meta.get("op") == "describe":
            continue
        checks.append(check_task_chain(t, meta))
        levels.setdefault(str(meta.get("level")), []).append(ok)
    if not checks:
        return {}
    n = len(checks)
    return {"chain_scanned": sum(c["scanned"] for c in checks) / n,
            "chain_consistent": sum(c["consistent"] for c in checks) / n,
            "chain_perceived": sum(c["perceived"] for c in checks) / n,
            "accuracy_cot_by_level": {k: sum(v) / len(v) for k, v in sorted(levels.items())}}


def evaluate(generate: Generate, rows: list[dict], *, cot_instruction: str = "", direct_instruction: str = "",
             max_tokens: int = 96) -> dict:
    """Evaluate on prompt-schema rows: `qa` rows give accuracies, `open` rows give the image-dependence measure;
    synthetic-task rows also give chain_rates (is the answer caused by what the chain states?)."""
    qa = [r for r in rows if r.get("answer") is not None]
    open_rows = [r for r in rows if r.get("answer") is None]
    # Longest answers first (descriptions, then chains, then direct answers): the engine runs requests in arrival
    # order, so the last ones to finish are short and the batch stays full until the end instead of ending on a
    # long tail of descriptions. `texts` below is put back in the order CoT, direct, open, open without the image.
    described = [greedy_request(r["question"], r["images"], max_tokens=max_tokens) for r in open_rows]
    described += [greedy_request(r["question"], r["images"], with_images=False, max_tokens=max_tokens)
                  for r in open_rows]
    chains = [greedy_request(r["question"] + cot_instruction, r["images"], max_tokens=max_tokens) for r in qa]
    answers = [greedy_request(r["question"] + direct_instruction, r["images"], max_tokens=max_tokens) for r in qa]
    out = generate(described + chains + answers) if qa or open_rows else []
    n, m = len(qa), len(open_rows)
    described_out, chains_out, answers_out = out[:2 * m], out[2 * m:2 * m + n], out[2 * m + n:]
    texts = chains_out + answers_out + described_out
    golds = [r["answer"] for r in qa]
    cot = score_answers(golds, texts[:n])
    direct = score_answers(golds, texts[n:2 * n])
    return {
        "accuracy_cot": cot["accuracy"], "accuracy_direct": direct["accuracy"],
        "format_failure_rate": cot["format_failure_rate"],
        "format_failure_rate_direct": direct["format_failure_rate"],
        "image_dependence": image_dependence(texts[2 * n:2 * n + m], texts[2 * n + m:]),
        "n_qa": n, "n_open": m, **chain_rates(qa, texts[:n], cot["correct"]),
        "examples": [{"id": r["id"], "gold": r["answer"], "text": t} for r, t in zip(qa[:3], texts[:3])],
    }


def offline_generator(model_dir: str, *, max_model_len: int = 512, kv_cache_gb: float = 1.0, dtype: str = "float32",
                      seed: int = 0) -> Generate:
    """An in-process vLLM engine as a `Generate` function (callers need an `if __name__ == "__main__":` guard)."""
    import os
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(kv_cache_gb))))
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, enforce_eager=True, max_model_len=max_model_len, dtype=dtype, seed=seed,
              limit_mm_per_prompt={"image": 1})

    def generate(requests: list[dict]) -> list[str]:
        params = [SamplingParams(n=q["n"], temperature=q["temperature"], top_p=q["top_p"],
                                 max_tokens=q["max_tokens"], seed=q.get("seed")) for q in requests]
        outs = llm.chat([q["messages"] for q in requests], params, use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    generate.llm = llm  # keep the engine reachable for callers that want to reuse or shut it down
    return generate
