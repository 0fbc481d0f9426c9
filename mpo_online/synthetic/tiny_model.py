"""Build the embedded default policy: a tiny, randomly initialised Idefics3 (SmolVLM architecture) or Llama model.

No model hub is reachable here, so the project writes its own Hugging Face model directory from code:
safetensors weights, config, a character-level tokenizer (the `tokenizers` library), the Idefics3 processor with
its PIL image processor, and a chat template that accepts OpenAI-style content lists. The directory loads with
`AutoModelForImageTextToText` / `AutoProcessor` (or `AutoModelForCausalLM` with `--text-only`) and with vLLM on CPU.

Launched by `mpo-online init-model --out DIR [--text-only]`, and by the jobs when `model.path` does not exist yet
and `model.init_if_missing` is set. Nothing else in mpo-online assumes this model: it is just one checkpoint directory.

Sizing (why these numbers):
- Images are 64x64 px, patch 16 -> a 4x4 patch grid; the task generator draws one shape per 16 px cell, so one patch
  sees one cell. scale_factor 1 (no pixel shuffle) keeps one image token per cell: 16 tokens. With SmolVLM's 2 (4
  cells per token) SFT on 2,000 tasks x 4 epochs reached 22% held-out accuracy (blind bound 19%); with one token per
  cell and 16,000 fresh tasks, counting is learnt in ~1,000 steps (measured, docs/experiments.md, "Session 6").
- Text model: hidden 128, 2 heads of 64 (vLLM's CPU attention supports head sizes 32, 64, 80, ...; 16 fails at the
  first forward), 4 layers, MLP 512. With the vision tower this is ~1.24M parameters: a training step on a batch of
  ~150-token sequences takes milliseconds on 2 cores, and vLLM samples thousands of tokens per second.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

# Tokens the Idefics3 processor and vLLM's idefics3 model look up by name.
IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
SPECIAL_TOKENS = ["<pad>", "<unk>", END_OF_UTTERANCE, IMAGE_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN]
# The processor resolves the 36 row/col tile tags even with image splitting off; give them real ids.
TILE_TOKENS = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # letters, digits, punctuation, space, newline

# "User: <image>question<end_of_utterance>\nAssistant: answer<end_of_utterance>\n". Content may be a string or an
# OpenAI-style list of parts; image parts ("image" or "image_url") become the <image> placeholder the processor expands.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] | capitalize ~ ': ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] in ['image', 'image_url'] -%}{{ '<image>' }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_utterance>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant: ' }}{%- endif -%}"
)
# Same, for the text-only model: image parts are dropped.
TEXT_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("'<image>'", "''")


def build_tokenizer():
    """A character-level `PreTrainedTokenizerFast`: one id per printable character, plus the special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + TILE_TOKENS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every character is its own pre-token; special tokens are matched before this split runs.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # join characters back without inserted spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token=END_OF_UTTERANCE,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[3:] + TILE_TOKENS})
    return tok


def build_model_dir(out: str | Path, *, text_only: bool = False, seed: int = 0, hidden: int = 128,
                    layers: int = 4, heads: int = 2, intermediate: int = 512, vision_hidden: int = 64,
                    vision_layers: int = 2, image_size: int = 64, patch_size: int = 16, scale_factor: int = 1) -> Path:
    """Write a randomly initialised tiny policy to `out` and return the path.

    `hidden / heads` must be a head size vLLM's CPU attention supports (32, 64, 80, 96, 112, 128, ...).
    """
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        LlamaConfig,
        LlamaForCausalLM,
    )

    head_dim = hidden // heads
    if head_dim not in (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512):
        raise ValueError(f"hidden/heads = {head_dim} is not a head size vLLM's CPU attention supports")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    text_cfg = dict(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    if text_only:
        model = LlamaForCausalLM(LlamaConfig(**text_cfg))
        tok.chat_template = TEXT_CHAT_TEMPLATE
        tok.save_pretrained(out)
    else:
        config = Idefics3Config(
            text_config=LlamaConfig(**text_cfg),
            vision_config=dict(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                               num_hidden_layers=vision_layers, num_attention_heads=max(1, vision_hidden // 32),
                               image_size=image_size, patch_size=patch_size),
            scale_factor=scale_factor, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
            pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
        )
        model = Idefics3ForConditionalGeneration(config)
        image_processor = Idefics3ImageProcessorPil(
            do_image_splitting=False, size={"longest_edge": image_size},
            max_image_size={"longest_edge": image_size}, do_resize=True,
        )
        image_seq_len = (image_size // patch_size) ** 2 // scale_factor**2
        processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=image_seq_len,
                                      chat_template=CHAT_TEMPLATE)
        processor.save_pretrained(out)
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(out)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())
    (out / "mpo_online_model.json").write_text(json.dumps(
        {"built_by": "mpo_online.synthetic.tiny_model", "seed": seed, "text_only": text_only, "parameters": n_params},
        indent=1))
    return out
