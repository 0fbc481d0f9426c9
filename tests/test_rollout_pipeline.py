"""Integration test of mpo_online.rollout.pipeline: a real vLLM-CPU policy behind real Ray Serve, real Ray Data.

The policy is the tiny Idefics3 with hand-set weights whose outputs we control: every attention/MLP output
projection is zero, so each position's hidden state is its own token embedding and the model is a character
bigram chain. After "Assistant: " it writes "Hm\\n\\boxed{D}" with D a random digit 0-5 (sometimes two digits),
then <end_of_utterance>. Level-1 counting tasks have answers 0-5, so a prompt's 8 samples usually mix right and
wrong answers (correctness pairs), some answers contain others ("3" in "31": the substring skip), identical texts
recur (the duplicate rule), and "Describe the image." prompts get Dropout-NTP pairs whose prefix is "Hm".
The app is deployed once for the module (~30 s); the module runs in about two minutes, of which ~35 s are the
replacement replica's start after the kill test's crash.
"""

import hashlib
import json
import math
import os
import re
import time

import pyarrow.parquet as pq
import pytest

from mpo_online.data.records import pair_schema, table_to_pairs
from mpo_online.pairs import ntp_prefix
from mpo_online.rollout.pipeline import interval_union, run_round

pytestmark = pytest.mark.integration

APP = "mpo-rollout-test"
PORT = 8123  # not 8000: other test modules serve there
SAMPLES, MAX_PAIRS, RATIO = 8, 3, 0.5


def test_interval_union():
    assert interval_union([]) == 0.0
    assert interval_union([(0, 2), (1, 3), (5, 6), (5.5, 5.8)]) == 4.0
    assert interval_union([(4, 5), (0, 1)]) == 2.0


def _bigram_policy(out_dir):
    """A tiny Idefics3 directory that samples from a hand-written character bigram chain (see module docstring)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from mpo_online.synthetic.tiny_model import build_model_dir

    path = build_model_dir(out_dir)
    tok = AutoTokenizer.from_pretrained(path)
    ids = {c: tok.convert_tokens_to_ids(c) for c in " Hm\n\\boxed{}0123456789"}
    eos = tok.eos_token_id
    digits = [ids[str(d)] for d in range(6)]
    chain = {" ": {ids["H"]: 1.0}, "H": {ids["m"]: 1.0}, "m": {ids["\n"]: 1.0}, "\n": {ids["\\"]: 1.0},
             "\\": {ids["b"]: 1.0}, "b": {ids["o"]: 1.0}, "o": {ids["x"]: 1.0}, "x": {ids["e"]: 1.0},
             "e": {ids["d"]: 1.0}, "d": {ids["{"]: 1.0}, "{": {t: 1 / 6 for t in digits}, "}": {eos: 1.0}}
    for d in range(6):
        chain[str(d)] = {ids["}"]: 0.75, **{t: 0.25 / 6 for t in digits}}
    weights = load_file(path / "model.safetensors")
    hidden = weights["lm_head.weight"].shape[1]
    embed = torch.zeros_like(weights["model.text_model.embed_tokens.weight"])
    head = torch.zeros_like(weights["lm_head.weight"])
    for state, (char, nxt) in enumerate(chain.items()):  # state i: one-hot embedding on dimension i
        embed[ids[char], state] = 1.0
        logits = torch.full((head.shape[0],), -40.0)
        for t, p in nxt.items():
            logits[t] = math.log(p)
        head[:, state] = logits / math.sqrt(hidden)  # final RMSNorm scales a unit one-hot to sqrt(hidden)
    weights["model.text_model.embed_tokens.weight"], weights["lm_head.weight"] = embed, head
    weights["model.text_model.norm.weight"] = torch.ones(hidden)
    for name in weights:
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")) and "text_model" in name:
            weights[name] = torch.zeros_like(weights[name])
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _boxed(text):
    m = re.search(r"\\boxed\{(\d+)\}", text)
    return int(m.group(1)) if m else None


@pytest.fixture(scope="module")
def env(tmp_path_factory, policy_app):
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    from mpo_online.data.prompts import to_ray_dataset
    from mpo_online.synthetic.tasks import generate_tasks

    tmp = tmp_path_factory.mktemp("rollout")
    model = _bigram_policy(tmp / "policy")
    rows = generate_tasks(30, seed=3, levels=(1,), open_fraction=0.25)
    # Bad rows inside the Dataset itself (read_prompts would have quarantined them; the pipeline must too).
    rows.append({**rows[0], "id": "bad-image", "images": [b"\x89PNG\r\n\x1a\n not really a png"]})
    rows.append({**rows[1], "id": "bad-question", "question": "   "})
    # Seeded requests crash vLLM-CPU 0.32 when a prefill is split across steps ("CPU Generator does not use
    # offset" in _bookkeeping_sync), so prefills must not be chunked.
    with policy_app(model, app=APP, port=PORT, max_model_len=256, max_num_seqs=128, kv_cache_gb=1,
                    engine_kwargs={"enable_chunked_prefill": False}) as client:
        yield {"client": client, "ds": to_ray_dataset(rows, block_rows=16), "rows": {r["id"]: r for r in rows},
               "model": str(model), "tmp": tmp}


def _round(env, out, **kw):
    args = dict(client=env["client"], round=0, policy_version=0, out_dir=out, samples_per_prompt=SAMPLES,
                temperature=1.0, top_p=1.0, max_tokens=16, prompts_per_round=64, max_pairs_per_prompt=MAX_PAIRS,
                ntp_prefix_ratio=RATIO, dropout_ntp=True, cot_instruction=" Think step by step.", seed=5,
                policy_dir=env["model"], batch_size=4, concurrency=3, ntp_concurrency=2)
    return run_round(env["ds"], **{**args, **kw})


@pytest.fixture(scope="module")
def first(env):
    out = env["tmp"] / "run_a"
    return _round(env, out), out / "round_0000"


def test_round_produces_both_kinds_with_correct_labels(env, first):
    stats, rdir = first
    pairs = table_to_pairs(pq.read_table(rdir / "pairs.parquet"))
    kinds = {p.kind for p in pairs}
    assert kinds == {"correctness", "dropout_ntp"}, stats.to_dict()
    for p in pairs:
        row = env["rows"][p.prompt_id]
        assert p.question == row["question"] + " Think step by step." and p.images == row["images"]
        assert p.round == 0 and p.policy_version == 0
        if p.kind == "correctness":  # verdicts against the ground truth, checked independently of verify.py
            gold = int(row["answer"])
            assert _boxed(p.chosen) == gold and p.chosen_correct is True and p.chosen_answer == str(gold)
            assert _boxed(p.rejected) != gold and p.rejected_correct is False
            assert str(gold) not in (p.rejected_answer or "")  # the substring skip held
        else:
            assert row["answer"] is None and p.chosen_correct is None
            assert p.ntp_prefix == ntp_prefix(p.chosen, RATIO) == "Hm"
            assert p.chosen.startswith(p.ntp_prefix) and p.rejected.startswith(p.ntp_prefix)


def test_rollouts_verdicts_and_image_free_continuations(env, first):
    stats, rdir = first
    rollouts = pq.read_table(rdir / "rollouts.parquet").to_pylist()
    samples = [r for r in rollouts if r["source"] == "rollout"]
    conts = [r for r in rollouts if r["source"] == "ntp_continuation"]
    assert len(samples) == stats.samples == SAMPLES * (stats.qa_prompts + stats.open_prompts)
    for r in samples:
        row = env["rows"][r["prompt_id"]]
        assert r["n_images_sent"] == 1 and r["served_version"] == 0
        if row["answer"] is None:
            assert r["correct"] is None
        else:
            assert r["correct"] == (_boxed(r["text"]) == int(row["answer"]))
    pairs = table_to_pairs(pq.read_table(rdir / "pairs.parquet"))
    # one continuation per Dropout-NTP chosen; those reproducing the chosen text gave no pair
    assert len(conts) == stats.pairs["dropout_ntp"] + stats.skipped.get("ntp_same_as_chosen", 0)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(env["model"])
    for c in conts:  # the continuation's engine prompt had no image and ended with the chosen's prefix tokens
        prompt = tok.decode(c["prompt_token_ids"])
        assert c["n_images_sent"] == 0 and "<image>" not in prompt and prompt.endswith("Assistant: Hm")
        assert len(c["token_ids"]) == len(c["logprobs"]) == c["n_tokens"]
    assert {p.rejected for p in pairs if p.kind == "dropout_ntp"} <= {"Hm" + c["text"] for c in conts}
    qa = [r for r in samples if r["correct"] is not None]
    assert stats.sample_accuracy == round(sum(r["correct"] for r in qa) / len(qa), 4)


def test_caps_skips_and_rejects(env, first):
    stats, rdir = first
    pairs = table_to_pairs(pq.read_table(rdir / "pairs.parquet"))
    per_prompt = {}
    for p in pairs:
        per_prompt[(p.prompt_id, p.kind)] = per_prompt.get((p.prompt_id, p.kind), 0) + 1
        assert p.chosen != p.rejected
    assert max(per_prompt.values()) <= MAX_PAIRS
    assert len({p.pair_id for p in pairs}) == len(pairs)
    for reason in ("duplicate_response", "over_cap", "all_wrong", "ntp_same_as_chosen"):
        assert stats.skipped.get(reason, 0) > 0, stats.skipped
    rejects = [json.loads(line) for line in (rdir / "rejects.jsonl").read_text().splitlines()]
    by_id = {r["prompt_id"]: r["reason"] for r in rejects}
    assert by_id == {"bad-image": "undecodable_image", "bad-question": "missing_question"}
    assert stats.rejects == 2 and stats.prompts == 32
    saved = json.loads((rdir / "pairs_stats.json").read_text())
    assert saved["pairs"] == stats.pairs and saved["rejects_by_reason"] == stats.rejects_by_reason
    # the engine's busy time is the union of the requests' spans, inside the window from the first request's start
    # to the last one's end (a sum of overlapping spans would exceed it), and the fraction is of the round's wall time
    sec = stats.seconds
    assert sec["engine_busy"] > 0 and stats.tokens_generated > 0
    assert sec["before_first_request"] + sec["engine_busy"] + sec["after_last_request"] <= sec["total"] + 0.01, sec
    assert stats.engine_busy_fraction == pytest.approx(sec["engine_busy"] / sec["total"], abs=1e-3)
    stages = {"select", "rollout", "verify", "pairs", "ntp"}
    assert set(stats.seconds["stage_active"]) == set(stats.seconds["stage_window"]) == stages
    print("\nround stats:", json.dumps({k: saved[k] for k in ("pairs", "skipped", "seconds",
                                                              "engine_busy_fraction", "sample_accuracy")}))


def test_parquet_loads_with_datasets_and_pyarrow(first):
    import datasets

    _, rdir = first
    table = pq.read_table(rdir / "pairs.parquet")
    assert table.schema.equals(pair_schema(), check_metadata=False)
    ds = datasets.load_dataset("parquet", data_files=str(rdir / "pairs.parquet"), split="train")
    assert ds.num_rows == table.num_rows
    row = ds[0]
    assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    assert row["images"][0].size == (64, 64)  # decoded as an HF Image feature


@pytest.mark.slow
def test_rerun_same_seed_gives_same_pairs_even_when_the_replica_dies(env, first):
    """The round again with the same seed, and the app's only replica killed (ray.kill, as a crash would) when the
    first prompts reach the driver: the calls in flight on it fail over to the replica Serve starts in its place (the
    client resends a call whose replica died), and the round ends with the very rollouts and pairs of the first one
    (seeded samples): none lost, none doubled. The replacement serves the published version. Another seed gives other
    pairs."""
    import ray

    from serving.client import running_replicas
    from serving.weight_sync import STALE_AFTER_S
    stats, rdir = first
    client = env["client"]
    victims = [a for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith(f"SERVE_REPLICA::{APP}#PolicyServer")]
    assert len(victims) == 1
    at_kill = []

    def kill_once(done, total, n_pairs):
        if not at_kill:
            at_kill.append((done, total))
            ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=True)

    again = _round(env, env["tmp"] / "run_b", progress=kill_once)
    assert at_kill and at_kill[0][0] < at_kill[0][1]  # most of the round was still to be sampled
    digest = hashlib.sha256((rdir / "pairs.parquet").read_bytes()).hexdigest()
    assert again.files["pairs.parquet"] == stats.files["pairs.parquet"] == digest
    assert again.files["rollouts.parquet"] == stats.files["rollouts.parquet"]
    assert running_replicas(client.app_name, client.deployment_name) == 1
    # The registry lists the dead replica until its last report is STALE_AFTER_S old (it is never told of the
    # death); the round can end before that, so wait for it to age out, then only the replacement is listed.
    deadline, dead = time.time() + STALE_AFTER_S + 30, victims[0]["name"].split("#")[-1]
    while dead in (versions := client.replica_versions()) and time.time() < deadline:
        time.sleep(1.0)
    assert dead not in versions and set(versions.values()) == {client.current_version()}, versions
    other = _round(env, env["tmp"] / "run_c", seed=6)
    assert other.files["pairs.parquet"] != digest
