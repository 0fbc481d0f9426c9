"""Tests for mpo_online.trainer: batching and log-probs on the tiny models, then real Ray Train + DeepSpeed runs.

Integration runs (2 workers, gloo, torch AdamW) share one `ray.init(num_cpus=4)` for the module and tiny data
(24 pairs of 64x64 PNGs, micro-batch 4 -> 3 micro-batches per worker). Two `train_policy` runs: ZeRO-0 MPO with an
injected NaN (the golden bits), and ZeRO-3 MPO interrupted after step 1 and resumed; and one TrainerSession (the
loop's worker group that lives across rounds) serving the other calls: rounds, a redo, an early stop, ZeRO stages
0-2 and SFT on the text-only model, and a failing call.
"""

import io
import json
import math
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)

N_PAIRS = 24
COMMON = dict(micro_batch_size=4, global_batch_size=8, lr=1e-3, weight_decay=0.0, warmup_ratio=0.0,
              max_length=96, num_workers=2, worker_cpus=1.0)
CARRIED = {"mode": "cumulative", "decay": 0.99, "value": 0.05, "count": 2.0}   # delta from a "previous round"


def _png(rgb) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), rgb).save(buf, format="PNG")
    return buf.getvalue()


def _pairs(n=N_PAIRS):
    from mpo_online.data.records import PreferencePair
    return [PreferencePair(pair_id=f"p{i:03d}", prompt_id=f"q{i}", kind="correctness", question=f"How many {i}?",
                           images=[_png(((37 * i) % 256, 90, 200))], chosen=f"Final answer: {i % 7}",
                           rejected=f"Final answer: {(i + 3) % 7}x") for i in range(n)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from mpo_online.synthetic.tiny_model import build_model_dir
    root = tmp_path_factory.mktemp("models")
    return {"vlm": str(build_model_dir(root / "vlm")), "txt": str(build_model_dir(root / "txt", text_only=True))}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    from mpo_online.data.records import pairs_to_table, write_parquet_atomic
    path = tmp_path_factory.mktemp("data") / "pairs.parquet"
    write_parquet_atomic(pairs_to_table(_pairs()), path)
    return str(path)


@pytest.fixture(scope="module")
def rows():
    from mpo_online.data.records import pairs_to_table
    return pairs_to_table(_pairs(3)).to_pylist()


@pytest.fixture(scope="module")
def ray4():
    import ray
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _weights(d):
    from safetensors.torch import load_file
    return load_file(os.path.join(d, "model.safetensors"))


# --- batching / log-probs (no Ray) ---------------------------------------------------------------------------------

def test_batching_masks_prompt_tokens_exactly(models, rows):
    from mpo_online.trainer.batching import IGNORE_INDEX, PairCollator
    col = PairCollator.from_pretrained(models["vlm"], max_length=512)
    b = col(rows)
    t = b.tensors
    assert b.n_pairs == 3 and t["input_ids"].shape[0] == 6 and tuple(t["pixel_values"].shape[:2]) == (6, 1)
    tok = col.tokenizer
    # Prompt "User: <fake><global-img><image>xN<fake>How many i?<eou>\nAssistant: " with the char-level tokenizer:
    # 6 + (N + 3) image tokens + 11 + 1 + 1 + 11 tokens; N = 16 for the tiny default (one token per grid cell).
    # Targets: the answer's characters + <end_of_utterance>.
    n_image = col.processor.image_seq_len
    assert n_image == 16
    n_prompt = 6 + n_image + 3 + 11 + 1 + 1 + 11
    for s, (i, answer) in enumerate([(0, "Final answer: 0"), (1, "Final answer: 1"), (2, "Final answer: 2"),
                                     (0, "Final answer: 3x"), (1, "Final answer: 4x"), (2, "Final answer: 5x")]):
        n = int(t["attention_mask"][s].sum())
        labels = t["labels"][s]
        assert (labels[:n_prompt] == IGNORE_INDEX).all() and (labels[n:] == IGNORE_INDEX).all()
        assert tok.decode(labels[n_prompt:n]) == answer + "<end_of_utterance>"
        assert n - n_prompt == len(answer) + 1
        assert (labels[n_prompt:n] == t["input_ids"][s, n_prompt:n]).all()
        assert tok.decode(t["input_ids"][s, :n_prompt]).endswith(f"How many {i}?<end_of_utterance>\nAssistant: ")
    # chosen s and rejected 3 + s share the prompt (ids and image)
    assert (t["input_ids"][0, :n_prompt] == t["input_ids"][3, :n_prompt]).all()
    assert (t["pixel_values"][0] == t["pixel_values"][3]).all()
    assert b.keys == ["p000", "p001", "p002"]


def test_batching_text_only_truncates_the_response_side(models, rows):
    from mpo_online.trainer.batching import IGNORE_INDEX, PairCollator
    col = PairCollator.from_pretrained(models["txt"], max_length=33, pairs=False)
    b = col(rows)
    t = b.tensors
    assert t["input_ids"].shape == (3, 33) and "pixel_values" not in t   # SFT layout: chosen only
    # "User: How many 0?<end_of_utterance>\nAssistant: " = 6 + 11 + 1 + 1 + 11 = 30 tokens; 33 - 30 = 3 targets.
    labels = t["labels"][0]
    assert (labels[:30] == IGNORE_INDEX).all()
    assert col.tokenizer.decode(labels[30:]) == "Fin"   # cut before the eos: no end-of-turn target


def test_batching_uses_sampled_token_ids_verbatim(models, rows):
    from mpo_online.trainer.batching import IGNORE_INDEX, PairCollator
    col = PairCollator.from_pretrained(models["vlm"], max_length=512)
    tok = col.tokenizer
    eou, tile, image = (tok.convert_tokens_to_ids(t) for t in ("<end_of_utterance>", "<row_1_col_1>", "<image>"))
    chars = tok("Final", add_special_tokens=False)["input_ids"]
    sampled = [chars + [tile, eou],   # stopped on EOS, with a special token the text would have lost
               chars[:3]]             # cut off by max_tokens: no EOS was sampled, none may be appended
    ids_rows = [{**rows[0], "chosen_token_ids": sampled[0], "rejected_token_ids": sampled[1]},
                {**rows[1], "chosen_token_ids": sampled[1]}]  # rejected without ids: the text path
    t = col(ids_rows).tensors
    text = col(rows[:2]).tensors
    n_prompt = int((text["labels"][0] == IGNORE_INDEX).sum() - (text["attention_mask"][0] == 0).sum())
    for s, want in enumerate([sampled[0], sampled[1], sampled[1]]):  # chosen 0, chosen 1, rejected 0
        n = int(t["attention_mask"][s].sum())
        assert t["labels"][s, n_prompt:n].tolist() == want and (t["labels"][s, :n_prompt] == IGNORE_INDEX).all()
        assert t["input_ids"][s, :n_prompt].tolist() == text["input_ids"][s % 2, :n_prompt].tolist()  # same prompt
    n = int(t["attention_mask"][3].sum())   # rejected 1 has no ids: tokenized text with its end-of-turn token
    assert tok.decode(t["labels"][3, n_prompt:n]) == "Final answer: 4x<end_of_utterance>"
    cut = PairCollator.from_pretrained(models["vlm"], max_length=n_prompt + 2)(ids_rows[:1]).tensors
    assert cut["labels"][0, n_prompt:].tolist() == sampled[0][:2]   # max_length cuts the response side
    with pytest.raises(ValueError, match="placeholder"):
        col([{**rows[0], "chosen_token_ids": chars + [image]}])


def test_sequence_logps_equals_full_logits(models, rows):
    import torch

    from mpo_online.trainer.batching import PairCollator
    from mpo_online.trainer.logps import load_model, sequence_logps, token_logps
    for name in ("vlm", "txt"):
        model = load_model(models[name])
        t = PairCollator.from_pretrained(models[name], max_length=512)(rows).tensors
        with torch.no_grad():
            per_token = token_logps(model, t, chunk_size=5)                                  # (S, T)
        sum_lp, nll, n = sequence_logps(model, t, chunk_size=5)
        sum_lp.sum().backward()
        g_fused = model.get_output_embeddings().weight.grad.clone()
        model.zero_grad()
        logits = model(**{k: v for k, v in t.items() if k != "labels"}).logits.float()     # (S, T, V)
        lp = torch.log_softmax(logits[:, :-1], dim=-1)
        y = t["labels"][:, 1:]
        mask = y != -100
        ref = (lp.gather(2, y.clamp(min=0)[..., None]).squeeze(2) * mask).sum(1)             # (S,)
        ref.sum().backward()
        # per token: entry [s, t] is log p(labels[s, t]) at targets, 0 elsewhere
        want = torch.nn.functional.pad(lp.gather(2, y.clamp(min=0)[..., None]).squeeze(2) * mask, (1, 0))
        torch.testing.assert_close(per_token, want.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sum_lp, ref, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(nll, -ref / mask.sum(1), atol=1e-5, rtol=1e-5)
        assert n.tolist() == mask.sum(1).tolist() == [16, 16, 16, 17, 17, 17]
        torch.testing.assert_close(g_fused, model.get_output_embeddings().weight.grad, atol=1e-5, rtol=1e-4)


def test_preference_spans_cover_the_first_differing_line():
    """Token 9 = newline. chosen  1 2 9 | 3 4 5 9 | 6 9 ; rejected 1 2 9 | 3 7 5 9 | 8 9: they first differ at
    position 4 (4 vs 7), inside the line that starts after the newline at 2, so both spans are [3, 7) (through that
    line's newline). A rejected response that stops early (1 2 9 3) differs at 4 = its end: spans [3, 7) and [3, 4).
    Identical prefixes up to a newline-free end: the whole responses."""
    from mpo_online.trainer.batching import preference_spans
    nl = {9}
    assert preference_spans([1, 2, 9, 3, 4, 5, 9, 6, 9], [1, 2, 9, 3, 7, 5, 9, 8, 9], nl) == ((3, 7), (3, 7))
    assert preference_spans([1, 2, 9, 3, 4, 5, 9, 6, 9], [1, 2, 9, 3], nl) == ((3, 7), (3, 4))
    assert preference_spans([1, 2, 3], [1, 4], nl) == ((0, 3), (0, 2))


def test_first_diff_token_spans_cover_one_token():
    """chosen 1 2 9 3 4 5 ; rejected 1 2 9 3 7 5: first differ at position 4 (4 vs 7): spans [4, 5) on both sides.
    A rejected response that stops at 1 2 9 3 differs at 4 = its end: chosen [4, 5), rejected empty [4, 4).
    Identical responses: empty spans at their end."""
    from mpo_online.trainer.batching import first_diff_token_spans
    assert first_diff_token_spans([1, 2, 9, 3, 4, 5], [1, 2, 9, 3, 7, 5]) == ((4, 5), (4, 5))
    assert first_diff_token_spans([1, 2, 9, 3, 4, 5], [1, 2, 9, 3]) == ((4, 5), (4, 4))
    assert first_diff_token_spans([1, 2], [1, 2]) == ((2, 2), (2, 2))


def test_score_mask_limits_the_rewards_to_the_span_not_the_nll(models, rows):
    """pref_span="first_diff_line": sequence_logps sums the per-token log-probs over score_mask (the differing line
    of each pair) while the NLL (the SFT term) still averages over the whole response."""
    import torch

    from mpo_online.trainer.batching import IGNORE_INDEX, PairCollator
    from mpo_online.trainer.logps import load_model, sequence_logps, token_logps
    col = PairCollator.from_pretrained(models["vlm"], max_length=512, pref_span="first_diff_line")
    tok = col.tokenizer
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]   # noqa: E731 (character-level)
    chosen, rejected = ids("r: 1.2 = 2\nFinal answer: 2"), ids("r: 1.. = 1\nFinal answer: 1")
    row = {**rows[0], "chosen_token_ids": chosen, "rejected_token_ids": rejected}
    b = col([row])
    assert b.spans == [(0, 11), (0, 11)]   # the first line, through its newline
    t = b.tensors
    n_prompt = int((t["labels"][0] == IGNORE_INDEX).sum() - (t["attention_mask"][0] == 0).sum())
    assert t["score_mask"][0].nonzero().flatten().tolist() == list(range(n_prompt, n_prompt + 11))
    model = load_model(models["vlm"])
    with torch.no_grad():
        per_token = token_logps(model, {k: v for k, v in t.items() if k != "score_mask"})   # (2, T)
        sum_lp, nll, n = sequence_logps(model, t)
    torch.testing.assert_close(sum_lp, (per_token * t["score_mask"]).sum(1))
    torch.testing.assert_close(nll, -per_token.sum(1) / n)
    assert n.tolist() == [len(chosen), len(rejected)]
    # "first_diff_token": only the cell read two ways ("2" vs "." at response position 5)
    t1 = PairCollator.from_pretrained(models["vlm"], max_length=512, pref_span="first_diff_token")([row])
    assert t1.spans == [(5, 6), (5, 6)]
    assert t1.tensors["score_mask"].nonzero()[:, 1].tolist() == [n_prompt + 5, n_prompt + 5]


def test_training_reads_the_sampled_token_ids():
    """Dropping the token columns before training would make the collator re-tokenize the text (and append an
    end-of-turn token to responses the engine cut off): the trainer would score sequences the engine never sampled."""
    from mpo_online.data.records import TOKEN_COLUMNS, pair_schema
    from mpo_online.trainer.launch import train_columns
    assert set(TOKEN_COLUMNS) <= set(train_columns(pair_schema().names, pairs=True))
    assert "rejected" not in train_columns(pair_schema().names, pairs=False)
    with pytest.raises(ValueError, match="rejected"):
        train_columns(["prompt", "chosen"], pairs=True)


def test_early_stop_on_the_loss(session_runs):
    from mpo_online.trainer.worker import _loss_below
    hist = [{"loss": x} for x in (0.5, 0.2, 0.1, 0.06)]
    assert not _loss_below(hist, None, 2) and not _loss_below(hist[:1], 1.0, 2)
    assert _loss_below(hist, 0.081, 2) and not _loss_below(hist, 0.079, 2)   # mean of the last two: 0.08
    stopped = session_runs["stopped"]
    assert stopped.metrics["steps"] == 1 and stopped.metrics["total_steps"] == 3 and stopped.metrics["stopped_early"]
    assert not session_runs["r1"].metrics["stopped_early"]


def test_schedule_and_plan():
    from mpo_online.trainer import plan_steps
    from mpo_online.trainer.worker import lr_factor
    assert [round(lr_factor(s, total_steps=5, warmup_steps=1), 6) for s in range(5)] == \
        [0.5, 1.0, round(0.5 * (1 + math.cos(math.pi / 4)), 6), 0.5, round(0.5 * (1 + math.cos(3 * math.pi / 4)), 6)]
    # 203 rows, 2 workers -> 101 each; micro 8 -> 13 micro-batches/epoch; global 32 -> accumulation 2 -> 6 steps/epoch
    assert plan_steps(203, num_workers=2, micro_batch_size=8, global_batch_size=32, epochs=2) == \
        {"grad_accum": 2, "micro_per_epoch": 13, "total_steps": 13, "rows_per_worker": 101}
    with pytest.raises(ValueError):
        plan_steps(100, num_workers=2, micro_batch_size=8, global_batch_size=24, epochs=1)


# --- Ray Train + DeepSpeed ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zero0_run(ray4, models, pairs_file, tmp_path_factory):
    """ZeRO-0 MPO, policy = reference; rank 0 returns NaN log-probs on micro-batch 1 (3 per worker)."""
    from mpo_online.trainer import train_policy
    out = tmp_path_factory.mktemp("z0") / "policy"
    return train_policy(pairs_file, policy_dir=models["vlm"], out_dir=out, objective="mpo", zero_stage=0,
                        delta_state=CARRIED, _nan_on_micro_batches=(1,), **COMMON)


def test_mpo_zero0_first_step_skip_nan_and_export(zero0_run, models):
    r = zero0_run
    h0 = r.history[0]
    # policy == reference at step 0: rewards 0, so L_pref = -log s(0) = ln 2 and, with delta updated by the
    # step's mean reward 0 first: delta = (0.05 * 2 + 0) / 3, L_quality = -log s(-delta) - log s(delta)
    delta = 0.1 / 3
    assert abs(h0["loss_pref"] - math.log(2)) < 1e-6 and abs(h0["reward_margin"]) < 1e-6
    assert abs(h0["delta"] - delta) < 1e-12
    assert abs(h0["loss_quality"] - (math.log1p(math.exp(delta)) + math.log1p(math.exp(-delta)))) < 1e-6
    # the NaN micro-batch is dropped on both workers: 3 micro-batches -> 2 steps, 1 skipped
    assert r.metrics["skipped_nonfinite"] == 1 and r.metrics["steps"] == 2 and r.metrics["micro_batches"] == 3
    # delta: cumulative mean over the carried 2 updates and this call's per-step world-mean rewards
    rewards = [h["reward_mean"] for h in r.history]
    assert r.delta_state["count"] == 4 and abs(r.delta_state["value"] - (0.1 + sum(rewards)) / 4) < 1e-9
    # throughput is the run's tokens (both workers) over its training seconds, and per worker a half of it
    m = r.metrics
    assert m["tokens"] > 0 and m["train_seconds"] > 0 and m["startup_seconds"] > 0
    assert m["tokens_per_s"] == pytest.approx(m["tokens"] / m["train_seconds"])
    assert m["tokens_per_s_per_worker"] == pytest.approx(m["tokens_per_s"] / 2) and m["world_size"] == 2
    # one torch thread per reserved CPU, whatever the machine's core count: the same float reductions, so the same
    # weights, on any machine of the kind (and no thread oversubscription between workers)
    assert r.metrics["torch_threads"] == 1
    before, after = _weights(models["vlm"]), _weights(r.policy_dir)
    assert set(before) == set(after)
    assert all(bool(v.isfinite().all()) for v in after.values())
    assert any(not (before[k] == after[k]).all() for k in before)
    files = set(os.listdir(r.policy_dir))
    assert {"tokenizer.json", "processor_config.json", "chat_template.jinja", "mpo_train.json"} <= files
    assert json.loads(open(os.path.join(r.policy_dir, "mpo_train.json")).read())["objective"] == "mpo"


# sha256 of model.safetensors: the tiny VLM as built, and after the ZeRO-0 run above (2 workers on gloo, 2 AdamW
# steps); torch 2.13.0+cpu (constraints.txt), with mpo_online's float pins (MKL_CBWR=AVX2, ATEN_CPU_CAPABILITY=avx2,
# ONEDNN_MAX_CPU_ISA=AVX2: mpo_online/__init__.py). The build is the same everywhere; the trained bits are recorded per
# CPU vendor, because the pinned paths still differ between vendors (most likely MKL's, see below):
# - GenuineIntel: recorded on an Intel Xeon with AVX-512 (Sapphire Rapids), where the pins make MKL, ATen and oneDNN run
#   the kernels an AVX2-only machine runs. Without them it ended the 2 steps in b39f0b62..., with only ATen forced to
#   AVX2 in 4ddd6a4f....
# - AuthenticAMD: recorded on an AMD EPYC with AVX-512 (2026-12-03). Measured there: unpinned it ends in b39f0b62...
#   (the same bits as the unpinned Intel: with AVX-512 kernels the two vendors agree); with the pins in d7696606...;
#   MKL_CBWR=AUTO gives d7696606... too (so on AMD, MKL_CBWR=AVX2 changes nothing; the vendor difference is most
#   likely MKL's, though oneDNN's choices were not separated), MKL_CBWR=COMPATIBLE gives 0a51ce75... (perhaps
#   vendor-neutral; not checked on Intel, so not adopted). An AVX2-only AMD EPYC (the machine of issue 27) runs the
#   same AVX2 ATen/oneDNN kernels and the same vendor MKL path, so it should end in d7696606... as well: expected, not
#   yet verified there.
# A different sha on a recorded vendor means the float path changed (a 500-step warm start amplifies a last-bit
# difference into another policy); an unrecorded vendor fails with the sha to record.
BUILT_SHA = "a9b26b6bf57860cde5ecaec29c581d14dcd27cf69574913dd6479deaa4c71e92"
TRAINED_SHA = {"GenuineIntel": "893d534d2e859ca37dcefe6ae11d453e31f410aebfb99681e8de9d86c1b6a182",
               "AuthenticAMD": "d76966064d1248f7116fe53cd1c30fbaa539af6d4d9a645530fe12db0d66afa4"}


def test_same_bits_as_recorded_on_the_development_machine(zero0_run, models):
    import torch

    from mpo_online import pinned_cpu_env
    from mpo_online.run.machine import cpu_vendor
    from mpo_online.run.state import sha256_file
    vendor = cpu_vendor()
    where = (f"{vendor}, torch {torch.__version__}, ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, "
             f"pins {pinned_cpu_env()}")
    built = sha256_file(os.path.join(models["vlm"], "model.safetensors"))
    assert built == BUILT_SHA, f"the tiny model builds to other bits here ({where}): {built}"
    trained = sha256_file(os.path.join(zero0_run.policy_dir, "model.safetensors"))
    assert trained == TRAINED_SHA.get(vendor), f"the same 2 training steps end in other bits here ({where}): {trained}"


def test_exported_policy_loads_and_generates(zero0_run, rows):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mpo_online.trainer.batching import decode_images
    model = AutoModelForImageTextToText.from_pretrained(zero0_run.policy_dir)
    proc = AutoProcessor.from_pretrained(zero0_run.policy_dir)
    text = proc.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=False)
    enc = proc(text=[text], images=[decode_images(rows[0]["images"])], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 5 or out[0, -1].item() == proc.tokenizer.eos_token_id


@pytest.fixture(scope="module")
def session_runs(ray4, models, pairs_file, tmp_path_factory):
    """One TrainerSession (a worker group for the whole run), its calls, closed before the next tests: round 1 from
    the initial policy with a carried delta; round 2 from round 1's policy and delta; round 1 again into a fresh
    directory (what a resumed job does after a kill); one stopped on its loss; ZeRO stages 0-3 and a text-only SFT
    (for the slow tests); last, a call whose every micro-batch is non-finite (fails)."""
    from mpo_online.trainer.session import TrainerSession
    root = tmp_path_factory.mktemp("session")
    kw = {k: v for k, v in COMMON.items() if k not in ("num_workers", "worker_cpus")}
    s = TrainerSession.start(num_workers=2, worker_cpus=1.0, storage_dir=root / "storage")
    try:
        r1 = s.train(pairs_file, policy_dir=models["vlm"], out_dir=root / "p1", delta_state=CARRIED, seed=1, **kw)
        r2 = s.train(pairs_file, policy_dir=r1.policy_dir, out_dir=root / "p2", delta_state=r1.delta_state, seed=2,
                     progress_file=str(root / "progress" / "progress.json"), **kw)
        redo = s.train(pairs_file, policy_dir=models["vlm"], out_dir=root / "p1_redo", delta_state=CARRIED, seed=1,
                       **kw)
        # any loss is below 100: the call ends after its first optimizer step (of 3)
        stopped = s.train(pairs_file, policy_dir=models["vlm"], out_dir=root / "p_stop", seed=1, stop_loss=100.0,
                          stop_window=1, **kw)
        # ZeRO-0 to -3 on the ZeRO-0 run's data (NaN micro-batch included), and SFT of the text-only model:
        # the slow tests below compare them (here, they cost no Ray Train start-up of their own)
        stages = {stage: s.train(pairs_file, policy_dir=models["vlm"], out_dir=root / f"zero{stage}",
                                 objective="mpo", zero_stage=stage, delta_state=CARRIED, _nan_on_micro_batches=(1,),
                                 **kw) for stage in (0, 1, 2, 3)}
        stages["sft"] = s.train(pairs_file, policy_dir=models["txt"], out_dir=root / "sft", objective="sft",
                                epochs=2, **kw)
        with pytest.raises(RuntimeError, match="non-finite"):
            s.train(pairs_file, policy_dir=models["vlm"], out_dir=root / "bad", seed=1, max_nonfinite_steps=0,
                    _nan_on_micro_batches=(0, 1, 2), **kw)
        failed_closed = s.closed
    finally:
        s.close()
    return {"root": root, "r1": r1, "r2": r2, "redo": redo, "stopped": stopped, "failed_closed": failed_closed,
            "stages": stages}


def test_session_reuses_its_workers_and_carries_delta(session_runs, models):
    r1, r2, redo = session_runs["r1"], session_runs["r2"], session_runs["redo"]
    # the same worker processes served every call: no Ray Train start-up after the first
    assert r1.metrics["worker_pid"] == r2.metrics["worker_pid"] == redo.metrics["worker_pid"]
    assert r1.metrics["session"] and r1.metrics["steps"] == 3 and r2.metrics["steps"] == 3
    # policy == reference at round 1's first step (the SFT term aside, rewards are 0); delta: carried 2 updates
    # (0.05) + this step's world-mean reward 0 -> 0.1 / 3
    assert abs(r1.history[0]["loss_pref"] - math.log(2)) < 1e-6 and abs(r1.history[0]["delta"] - 0.1 / 3) < 1e-12
    # round 2 continues round 1's delta (cumulative mean over 2 + 3 + 3 updates) from round 1's weights
    rewards = [h["reward_mean"] for h in r1.history + r2.history]
    assert r2.delta_state["count"] == 8 and abs(r2.delta_state["value"] - (0.1 + sum(rewards)) / 8) < 1e-9
    assert abs(r2.history[0]["loss_pref"] - math.log(2)) < 1e-6   # its reference is round 1's policy
    w0, w1, w2 = _weights(models["vlm"]), _weights(r1.policy_dir), _weights(r2.policy_dir)
    assert any(not (w0[k] == w1[k]).all() for k in w0) and any(not (w1[k] == w2[k]).all() for k in w1)
    files = set(os.listdir(r2.policy_dir))
    assert {"model.safetensors", "tokenizer.json", "processor_config.json", "mpo_train.json"} <= files
    assert json.loads((session_runs["root"] / "progress" / "progress.json").read_text())["step"] == 3


def test_session_redo_is_exact_and_failures_close_it(session_runs):
    r1, redo = session_runs["r1"], session_runs["redo"]
    # redoing a round (a killed job resumes by redoing its train phase) gives the same steps and weights
    assert redo.history == [{**h, "seconds": redo.history[i]["seconds"]} for i, h in enumerate(r1.history)]
    w1, wr = _weights(r1.policy_dir), _weights(redo.policy_dir)
    assert all(bool((w1[k] == wr[k]).all()) for k in w1)
    # a worker error reaches the caller, closes the session and leaves no partial export behind
    assert session_runs["failed_closed"]
    assert not [p for p in os.listdir(session_runs["root"]) if p.startswith(".bad") or p == "bad"]


@pytest.mark.slow
def test_a_worker_killed_inside_a_session_call_fails_it_cleanly_and_a_new_session_redoes_it(ray4, models, pairs_file,
                                                                                           session_runs, tmp_path):
    """A training worker SIGKILLed inside a call (after step 1 of 3, its peer about to enter step 2's collectives):
    the call raises instead of hanging, the session is closed and no partial policy is left; a new session (what the
    rerun of a failed job starts) redoes the call to the same steps and weights as the session's uninterrupted one."""
    from mpo_online.trainer.session import TrainerSession
    kw = {k: v for k, v in COMMON.items() if k not in ("num_workers", "worker_cpus")}
    call = dict(policy_dir=models["vlm"], out_dir=tmp_path / "p1", delta_state=CARRIED, seed=1, **kw)
    s = TrainerSession.start(num_workers=2, worker_cpus=1.0, storage_dir=tmp_path / "storage")
    try:
        with pytest.raises(RuntimeError, match="Ray Train run ended|failed on a worker"):
            s.train(pairs_file, _fail_after_step=1, **call)
        assert s.closed
    finally:
        s.close()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".p1") or p == "p1"]
    s = TrainerSession.start(num_workers=2, worker_cpus=1.0, storage_dir=tmp_path / "storage")
    try:
        redo = s.train(pairs_file, **call)
    finally:
        s.close()
    r1 = session_runs["r1"]
    assert redo.history == [{**h, "seconds": redo.history[i]["seconds"]} for i, h in enumerate(r1.history)]
    w1, wr = _weights(r1.policy_dir), _weights(redo.policy_dir)
    assert all(bool((w1[k] == wr[k]).all()) for k in w1)


@pytest.mark.slow
def test_zero3_resume_keeps_delta_and_matches_zero0(ray4, models, pairs_file, zero0_run, tmp_path):
    from mpo_online.trainer import train_policy
    out, storage = tmp_path / "policy", tmp_path / "ray_train"
    kw = dict(policy_dir=models["vlm"], out_dir=out, objective="mpo", zero_stage=3, storage_dir=storage,
              run_name="z3", checkpoint_every=1, delta_state=CARRIED, **COMMON)
    # a worker process SIGKILLed after step 2's checkpoint (of 3 steps). The checkpoint it reported just before
    # dying can be lost with it (Ray Train registers a checkpoint once every worker's report arrives; measured: after
    # a kill at step 1 the rerun started from scratch), step 1's cannot: the rerun resumes from step 1 or 2
    with pytest.raises(RuntimeError, match="resume"):
        train_policy(pairs_file, _fail_after_step=2, **kw)
    assert not out.exists() and any(p.startswith("checkpoint_") for p in os.listdir(storage / "z3"))
    r = train_policy(pairs_file, **kw)
    assert r.metrics["resumed_from_step"] in (1, 2) and r.metrics["steps"] == 3 and len(r.history) == 3
    # ZeRO-3 step 1 == ZeRO-0 step 1 (same data order, weights, objective; the NaN was on micro-batch 1)
    for k in ("loss", "grad_norm", "reward_mean"):
        assert abs(r.history[0][k] - zero0_run.history[0][k]) < 1e-4 * max(1.0, abs(zero0_run.history[0][k]))
    # delta carried in (0.05 over 2 updates) + 3 updates, some of them before the restart
    rewards = [h["reward_mean"] for h in r.history]
    assert r.delta_state["count"] == 5
    assert abs(r.delta_state["value"] - (0.05 * 2 + sum(rewards)) / 5) < 1e-9
    before, after = _weights(models["vlm"]), _weights(r.policy_dir)
    assert any(not (before[k] == after[k]).all() for k in before)
    # a second call for the same out_dir and run returns the published result
    assert train_policy(pairs_file, **kw).history == r.history


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_train_like_zero0_and_export_loadable_weights(session_runs, models, stage):
    """ZeRO-1/2/3 (optimizer states, gradients, and at 3 the parameters, partitioned over the 2 workers) against
    ZeRO-0 on the same data in the same session: the same steps and losses, and an export in ZeRO-0's files, keys,
    shapes and dtypes (the export vLLM loads every round) that transformers loads, with ZeRO-0's weights up to float
    reduction order. Stages 0-2 save rank 0's full module; ZeRO-3 consolidates the partitioned weights on rank 0."""
    from mpo_online.trainer.logps import load_model
    r, r0 = session_runs["stages"][stage], session_runs["stages"][0]
    assert r.metrics["zero_stage"] == stage and r.metrics["steps"] == 2 and r.metrics["skipped_nonfinite"] == 1
    assert r0.metrics["zero_stage"] == 0 and r0.metrics["steps"] == 2
    for h, h0 in zip(r.history, r0.history, strict=True):
        for k in ("loss", "loss_pref", "loss_quality", "loss_gen", "reward_mean"):
            assert h[k] == pytest.approx(h0[k], rel=1e-4, abs=1e-6), (stage, k)
    z0, zs = _weights(r0.policy_dir), _weights(r.policy_dir)
    start = _weights(models["vlm"])
    assert set(os.listdir(r.policy_dir)) == set(os.listdir(r0.policy_dir))
    configs = [json.loads(Path(d, "config.json").read_text()) for d in (r.policy_dir, r0.policy_dir)]
    assert configs[0] == configs[1]
    assert {k: (v.shape, v.dtype) for k, v in zs.items()} == {k: (v.shape, v.dtype) for k, v in z0.items()}
    for k in z0:
        assert (zs[k] - z0[k]).abs().max() <= 1e-5 * max(1.0, float(z0[k].abs().max())), (stage, k)
    assert any(not (zs[k] == start[k]).all() for k in zs)  # and the steps did move the weights
    model = load_model(str(r.policy_dir))  # transformers: the architecture and every tensor of the export
    loaded = model.state_dict()
    assert set(zs) <= set(loaded)
    assert all(bool((loaded[k] == v).all()) for k, v in zs.items())


@pytest.mark.slow
def test_every_zero_stages_export_generates_in_vllm_as_in_the_trainers_model(session_runs, models, rows, tmp_path):
    """vLLM loads the export of every ZeRO stage: an engine starts on ZeRO-3's (vLLM's own loader), then ZeRO-0/1/2's
    and the untrained model's are swapped in through the loop's swap path (tests/vllm_greedy.py). On a fixed image
    prompt, each one's 8 greedy tokens are the trainer model's argmax at every position (teacher-forced in
    transformers) and their engine log-probs match the trainer's within 1e-3. The untrained model is there to show
    the swaps take effect: its log-probs differ from the trained ones'."""
    import subprocess
    import sys

    import torch
    from transformers import AutoProcessor

    from mpo_online.trainer.batching import decode_images
    from mpo_online.trainer.logps import load_model
    dirs = {f"zero{s}": str(session_runs["stages"][s].policy_dir) for s in (3, 0, 1, 2)} | {"untrained": models["vlm"]}
    proc = AutoProcessor.from_pretrained(dirs["zero0"])
    text = proc.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=False)
    image = decode_images(rows[0]["images"])[0]
    image.save(tmp_path / "image.png")
    (tmp_path / "spec.json").write_text(json.dumps({"text": text, "image": str(tmp_path / "image.png"),
                                                    "max_tokens": 8}))
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, str(root / "tests" / "vllm_greedy.py"), str(tmp_path / "spec.json"),
                           str(tmp_path / "engine.json"), *dirs.values()],
                          capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    engine = json.loads((tmp_path / "engine.json").read_text())
    enc = proc(text=[text], images=[[image]], return_tensors="pt")
    scored = {}
    for name, d in dirs.items():
        e = engine[d]
        assert e["prompt_ids"] == enc["input_ids"][0].tolist(), name  # the same prompt, image tokens included
        ids = torch.tensor([e["prompt_ids"] + e["ids"]])
        with torch.no_grad():
            logits = load_model(d)(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=enc["pixel_values"],
                                   pixel_attention_mask=enc.get("pixel_attention_mask")).logits[0].float()
        n = len(e["prompt_ids"])
        logps = torch.log_softmax(logits[n - 1:-1], dim=-1)                  # (8, V): position t predicts token t
        assert logps.argmax(-1).tolist() == e["ids"], name                   # greedy in vLLM = greedy in transformers
        trainer = logps.gather(-1, torch.tensor(e["ids"])[:, None])[:, 0]
        gap = float((trainer - torch.tensor(e["logprobs"])).abs().max())
        assert gap < 1e-3, (name, gap)
        scored[name] = trainer
    assert float((scored["untrained"] - scored["zero0"]).abs().max()) > 1e-2


@pytest.mark.slow
def test_sft_reduces_nll_text_only(session_runs, models):
    import torch

    from mpo_online.data.records import pairs_to_table
    from mpo_online.trainer.batching import PairCollator
    from mpo_online.trainer.logps import load_model, sequence_logps

    def mean_nll(model_dir):
        t = PairCollator.from_pretrained(model_dir, max_length=96, pairs=False)(
            pairs_to_table(_pairs()).to_pylist()).tensors
        with torch.no_grad():
            return float(sequence_logps(load_model(model_dir), t)[1].mean())

    r = session_runs["stages"]["sft"]
    assert r.metrics["steps"] == 6 and r.history[-1]["loss_gen"] < r.history[0]["loss_gen"]
    before, after = mean_nll(models["txt"]), mean_nll(r.policy_dir)
    assert after < before - 0.5, (before, after)
