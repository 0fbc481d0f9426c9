"""How much a self-improvement loop can harvest from a task family: the base model's greedy accuracy against its
pass@k, per difficulty level, on the word problems (mpo_online/synthetic/word_problems.py).

    python experiments/task_headroom.py --model artifacts/smollm2-135m --per-level 48 --k 8 [--levels 1 2 3]

One in-process vLLM engine (float32, the project's CPU pins). Prints JSON: per level and overall, greedy CoT accuracy,
format compliance (a parseable "Final answer:"), and pass@k / mean sample accuracy at the given temperature. The
gap between greedy accuracy and pass@k is what the loop's pairs are made of; a level where pass@k is ~0 gives none.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--per-level", type=int, default=48)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--instruction", default=None, help="CoT instruction appended to each question (default: the "
                   "smollm2_cpu.yaml config's data.cot_instruction)")
    p.add_argument("--seed", type=int, default=123)
    a = p.parse_args(argv)

    import os
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    from mpo_online.config import load_config
    from mpo_online.reward.verify import answers_match, extract_final_answer
    from mpo_online.synthetic.word_problems import generate_problems

    instruction = a.instruction if a.instruction is not None else \
        load_config("jobs/configs/smollm2_cpu.yaml").data.cot_instruction
    rows = [r for lv in a.levels for r in generate_problems(a.per_level, a.seed + lv, levels=(lv,))]
    llm = LLM(model=a.model, enforce_eager=True, max_model_len=1024, dtype="float32", seed=0,
              enable_chunked_prefill=False)
    msgs = [[{"role": "user", "content": r["question"] + instruction}] for r in rows]
    t = time.time()
    greedy = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=a.max_tokens), use_tqdm=False)
    sampled = llm.chat(msgs, SamplingParams(n=a.k, temperature=a.temperature, max_tokens=a.max_tokens),
                       use_tqdm=False)
    seconds = time.time() - t
    tokens = sum(len(o.token_ids) for out in greedy + sampled for o in out.outputs)

    def ok(text, gold):
        ans = extract_final_answer(text)
        return ans is not None and answers_match(ans, gold), ans is not None

    report = {"model": a.model, "instruction": instruction, "k": a.k, "temperature": a.temperature,
              "generated_tokens_per_s": round(tokens / seconds, 1), "levels": {}}
    for lv in a.levels + ["all"]:
        idx = [i for i, r in enumerate(rows) if lv == "all" or json.loads(r["meta"])["level"] == lv]
        g = [ok(greedy[i].outputs[0].text, rows[i]["answer"]) for i in idx]
        s = [[ok(o.text, rows[i]["answer"]) for o in sampled[i].outputs] for i in idx]
        report["levels"][str(lv)] = {
            "n": len(idx), "greedy_accuracy": sum(c for c, _ in g) / len(idx),
            "greedy_format": sum(f for _, f in g) / len(idx),
            f"pass@{a.k}": sum(any(c for c, _ in x) for x in s) / len(idx),
            "sample_accuracy": sum(c for x in s for c, _ in x) / (len(idx) * a.k),
            "sample_format": sum(f for x in s for _, f in x) / (len(idx) * a.k),
            "mixed_prompts": sum(0 < sum(c for c, _ in x) < a.k for x in s) / len(idx)}
    report["example"] = {"question": msgs[0][0]["content"], "greedy": greedy[0].outputs[0].text,
                         "gold": rows[0]["answer"]}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
