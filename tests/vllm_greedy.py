"""Greedy tokens and log-probs of several checkpoint directories from one vLLM engine, for tests/test_trainer.py.

    python tests/vllm_greedy.py SPEC_JSON OUT_JSON DIR [DIR ...]

SPEC_JSON: {"text": the chat-templated prompt, "image": a PNG path, "max_tokens": n}. The engine starts on the first
directory (vLLM's own loader reads that export) and each later one is swapped in through the loop's swap path, the
worker extension's `mpo_reload_from_path`, with the prefix, multimodal and encoder caches reset after each swap as
the serving replicas do. OUT_JSON gets, per directory, {"prompt_ids", "ids", "logprobs"}: `max_tokens` greedy tokens
(EOS ignored, so every directory yields the same number) and the engine's log-prob of each.

A separate process because an in-process engine spawns its core process, which re-imports `__main__` (pytest's).
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> None:
    spec, out_path, dirs = json.loads(open(argv[0]).read()), argv[1], argv[2:]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from PIL import Image
    from vllm import LLM, SamplingParams

    llm = LLM(model=dirs[0], enforce_eager=True, max_model_len=512, dtype="float32", seed=0,
              limit_mm_per_prompt={"image": 1}, enable_chunked_prefill=False,
              worker_extension_cls="serving.weight_sync.WeightSyncExtension")
    prompt = {"prompt": spec["text"], "multi_modal_data": {"image": Image.open(spec["image"]).convert("RGB")}}
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, logprobs=0)
    out = {}
    for i, d in enumerate(dirs):
        if i:
            llm.collective_rpc("mpo_reload_from_path", kwargs={"weights_dir": d})
            llm.reset_prefix_cache()
            llm.reset_mm_cache()
            llm.llm_engine.reset_encoder_cache()
        res = llm.generate([prompt], params, use_tqdm=False)[0]
        ids = list(res.outputs[0].token_ids)
        out[d] = {"prompt_ids": list(res.prompt_token_ids), "ids": ids,
                  "logprobs": [step[t].logprob for t, step in zip(ids, res.outputs[0].logprobs, strict=True)]}
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1:])
