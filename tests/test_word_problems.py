"""The text-only task family (mpo_online/synthetic/word_problems.py): deterministic, answers that follow from the stated
numbers, a held-out split disjoint from train, and rows the prompt reader and verifier take as they are."""

import json
import re
from fractions import Fraction

import pytest

from mpo_online.synthetic.word_problems import TEMPLATES, generate_problems, write_problem_splits


def _eval_step(line: str) -> Fraction:
    """'a op b = c' -> the exact value of `a op b` (the worked solutions use + - * / on integers)."""
    a, op, b = re.fullmatch(r"(\d+) ([-+*/]) (\d+) = \S+", line).groups()
    a, b = Fraction(int(a)), Fraction(int(b))
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]


def test_same_seed_same_rows_and_levels_in_turn():
    a, b = generate_problems(30, seed=4), generate_problems(30, seed=4)
    assert a == b and a != generate_problems(30, seed=5)
    assert [json.loads(r["meta"])["level"] for r in a[:6]] == [1, 2, 3, 1, 2, 3]
    assert len({r["question"] for r in a}) == 30 and all(r["images"] == [] and r["kind"] == "qa" for r in a)


def test_every_template_states_steps_that_give_its_answer():
    """Each solution line 'a op b = c' is right (checked exactly), and the last line's value is the answer, except
    the notebook template whose last step is a remainder ('x - p * q = r', checked as such)."""
    rows = generate_problems(300, seed=1, levels=(1, 2, 3, 4))
    assert {json.loads(r["meta"])["op"] for r in rows} == {n for lv in TEMPLATES.values() for n in lv}
    for r in rows:
        *steps, final = r["solution"].splitlines()
        assert final == f"Final answer: {r['answer']}"
        for line in steps:
            if line.count(" ") == 6:  # savings: "left - price * k = remainder"
                left, price, k, rem = map(int, re.findall(r"\d+", line))
                assert left - price * k == rem and 0 <= rem < price
            else:
                value = _eval_step(line)
                shown = line.rsplit("= ", 1)[1]
                assert Fraction(shown) == value, line
        assert Fraction(r["answer"]) >= 0


def test_fraction_answers_are_reduced_and_match_decimals():
    from mpo_online.reward.verify import answers_match

    fracs = [r for r in generate_problems(300, seed=2, levels=(4,)) if "/" in r["answer"]]
    assert fracs, "level 4 should give some fractional shares"
    for r in fracs:
        f = Fraction(r["answer"])
        assert f"{f.numerator}/{f.denominator}" == r["answer"]
        assert answers_match(f"{float(f):.4f}", r["answer"])  # a decimal within the verifier's 1e-3 tolerance
        assert not answers_match(str(f.numerator), r["answer"])


def test_splits_are_disjoint_and_load_as_prompts(tmp_path):
    from mpo_online.data.prompts import load_prompts

    info = write_problem_splits(tmp_path, n_train=60, n_heldout=20, seed=0, levels=(1, 2))
    train, rejected = load_prompts(tmp_path / "train.parquet")
    heldout = load_prompts(tmp_path / "heldout.parquet")[0]
    assert len(train) == 60 and len(heldout) == 20 and not rejected.counts
    assert not {r["question"] for r in train} & {r["question"] for r in heldout}
    assert info["splits"]["train"]["by_level"] == {"1": 30, "2": 30}


def test_ensure_tasks_refuses_a_directory_of_other_parameters(tmp_path):
    from mpo_online.warm_start import ensure_tasks

    kw = dict(generate_if_missing=True, n_train=40, n_heldout=10, seed=0, levels=[1, 2], max_count=5,
              open_fraction=0.0, task="word_problems")
    d = ensure_tasks(str(tmp_path / "wp"), **kw)
    before = (d / "train.parquet").read_bytes()
    assert ensure_tasks(str(d), **kw) == d and (d / "train.parquet").read_bytes() == before
    with pytest.raises(ValueError, match="other parameters"):
        ensure_tasks(str(d), **{**kw, "levels": [1, 2, 3]})
    with pytest.raises(ValueError, match="other parameters"):  # a word-problem dir is not a grid-task dir
        ensure_tasks(str(d), **{**kw, "task": "grid"})


def test_bad_levels_are_refused():
    with pytest.raises(ValueError, match="levels"):
        generate_problems(3, seed=0, levels=(5,))


def test_a_level_out_of_questions_is_an_error_not_a_hang():
    """Level 1 (one-digit numbers) has ~14.5k distinct questions: asking for more once drew forever (a run with
    `data.levels=[1] data.n_train=16000` sat in its warm start's task generation)."""
    with pytest.raises(ValueError, match=r"levels \[1\] ran out of distinct questions after 1[34]\d{3} of the 16000"):
        generate_problems(16000, seed=0, levels=(1,))


# --- checkpoints the loop refuses before starting (mpo_online.model_import.check_checkpoint) ----------------------

def _checkpoint(tmp_path, arch, template=True):
    d = tmp_path / arch
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": [arch]}))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"} if template else {}))
    return d


def test_check_checkpoint_accepts_verified_and_registry_architectures(tmp_path):
    from mpo_online.model_import import check_checkpoint
    assert check_checkpoint(_checkpoint(tmp_path, "LlamaForCausalLM"), vllm_registry=set()) == {
        "architecture": "LlamaForCausalLM", "verified": True}
    assert check_checkpoint(_checkpoint(tmp_path, "Qwen2ForCausalLM"), vllm_registry={"Qwen2ForCausalLM"})[
        "verified"] is False


def test_check_checkpoint_refuses_what_the_loop_cannot_run(tmp_path):
    from mpo_online.model_import import ModelImportError, check_checkpoint
    with pytest.raises(ModelImportError, match="not supported by the installed vLLM"):
        check_checkpoint(_checkpoint(tmp_path, "FooForCausalLM"), vllm_registry={"LlamaForCausalLM"})
    with pytest.raises(ModelImportError, match="no chat template"):
        check_checkpoint(_checkpoint(tmp_path, "LlamaForCausalLM", template=False), vllm_registry=set())
    with pytest.raises(ModelImportError, match="not a Hugging Face checkpoint"):
        check_checkpoint(tmp_path / "missing")
