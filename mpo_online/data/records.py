"""Typed records passed between stages, and their one conversion to and from Arrow.

Stages: prompts (mpo_online.data.prompts.PROMPT_SCHEMA) -> `Rollout` (one sampled response, verified) ->
`PreferencePair` (what the trainer consumes) -> `RoundManifest` (what a round did, for resume). Pairs are stored in the
layout TRL's DPOTrainer reads: conversational `prompt` / `chosen` / `rejected` message lists and an `images` column in
the Hugging Face `Image` feature layout ({bytes, path}), plus metadata columns. SFT examples (warm start, RFT baseline)
use the same schema with an empty `rejected`.

Token ids and engine log-probs: a response sampled by the engine keeps the token ids it was sampled as and the
engine's log-prob of each (`Rollout.token_ids / logprobs`, `PreferencePair.chosen_token_ids / ...`), so the trainer
scores exactly the sequence that was sampled instead of re-tokenizing its text (detokenization drops special tokens,
and a response cut off by the token limit has no end-of-turn token). These fields are optional everywhere: None for
text-only data (gold demonstrations, older pair files), which the trainer tokenizes from the text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

PAIR_KINDS = ("correctness", "dropout_ntp", "sft")


@dataclass
class Rollout:
    """One sampled response to one prompt."""
    prompt_id: str
    round: int
    policy_version: int
    sample_index: int
    text: str
    n_tokens: int
    finish_reason: str
    final_answer: str | None = None  # mpo_online.reward.verify.extract_final_answer(text)
    correct: bool | None = None  # None: no ground truth
    token_ids: list[int] | None = None  # as sampled (a final EOS included when generation stopped on it)
    logprobs: list[float] | None = None  # per token: the engine's log pi(token | prompt, earlier tokens)
    text_offsets: list[int] | None = None  # per token: where its text ends in `text` (special tokens add nothing)


@dataclass
class PreferencePair:
    """A chosen/rejected pair (or an SFT example when `rejected` is None) with where it came from."""
    pair_id: str
    prompt_id: str
    kind: str  # one of PAIR_KINDS
    question: str
    images: list[bytes]
    chosen: str
    rejected: str | None
    round: int = 0
    policy_version: int = 0
    gold_answer: str | None = None
    chosen_answer: str | None = None
    rejected_answer: str | None = None
    chosen_correct: bool | None = None
    rejected_correct: bool | None = None
    ntp_prefix: str | None = None  # Dropout-NTP: the kept prefix the rejected continuation starts from
    # The responses as token ids, and each token's engine log-prob under *this pair's prompt* (None when unknown:
    # e.g. a Dropout-NTP continuation, which was sampled without the image).
    chosen_token_ids: list[int] | None = None
    chosen_logprobs: list[float] | None = None
    rejected_token_ids: list[int] | None = None
    rejected_logprobs: list[float] | None = None

    @staticmethod
    def make_id(prompt_id: str, kind: str, chosen: str, rejected: str | None) -> str:
        """Content hash: the same pair always gets the same id (dedup across resumes)."""
        h = hashlib.sha256(json.dumps([prompt_id, kind, chosen, rejected]).encode()).hexdigest()
        return h[:20]


@dataclass
class RoundManifest:
    """What a round has done; written atomically after every phase so a killed run resumes where it stopped."""
    round: int
    phase: str  # "started" | "pairs" | "trained" | "swapped" | "evaluated" | "done"
    policy_version: int  # the version that sampled this round's rollouts
    seeds: dict = field(default_factory=dict)
    delta: dict = field(default_factory=dict)  # the MPO reward baseline state after training
    files: dict = field(default_factory=dict)  # relative path -> sha256
    stats: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RoundManifest:
        data = json.loads(text)
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


# --- conversational messages (TRL / OpenAI layout) ----------------------------------------------------------------

# Where a question puts its images. A question may mark each image's position with IMAGE_PLACEHOLDER (LLaVA / MMPR
# style); without placeholders (or with a count that does not match the images) the images come first, then the
# text, the order SmolVLM/Idefics3 data use. The synthetic tasks put the image AFTER the question: then the response
# starts at a fixed distance from every image token, which a small RoPE model can learn to read cell by cell.
IMAGE_PLACEHOLDER = "<image>"


def strip_placeholders(question: str) -> str:
    """The question's text with the image placeholders removed (for text-only prompts)."""
    return question.replace(IMAGE_PLACEHOLDER, "")


def content_parts(question: str, n_images: int, image_part) -> list[dict]:
    """The user turn's content parts: text pieces and `image_part(i)` for image i, in the question's layout."""
    pieces = question.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != n_images or n_images == 0:
        return [image_part(i) for i in range(n_images)] + [{"type": "text", "text": strip_placeholders(question)}]
    parts: list[dict] = []
    for i, piece in enumerate(pieces):
        if piece:
            parts.append({"type": "text", "text": piece})
        if i < n_images:
            parts.append(image_part(i))
    return parts


def user_message(question: str, n_images: int) -> list[dict]:
    """The prompt as one user turn (TRL layout: image parts carry no data; the row's `images` column does)."""
    return [{"role": "user", "content": content_parts(question, n_images, lambda i: {"type": "image", "text": None})}]


def prompt_question(messages: list[dict]) -> str:
    """The question of a user_message() prompt, placeholders back where images sat (none for images-first)."""
    parts = [p for m in messages or [] for p in (m["content"] if not isinstance(m["content"], str)
                                                  else [{"type": "text", "text": m["content"]}])]
    kinds = [p.get("type") == "text" for p in parts]
    if not any(t and not kinds[i + 1] for i, t in enumerate(kinds[:-1])):  # no image after a text: images first
        return message_text(messages)
    return "".join(p.get("text") or "" if p.get("type") == "text" else IMAGE_PLACEHOLDER for p in parts)


def assistant_message(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def message_text(messages: list[dict]) -> str:
    """Concatenated text parts of a message list (images dropped)."""
    out = []
    for m in messages or []:
        content = m["content"]
        if isinstance(content, str):
            out.append(content)
        else:
            out.extend(p.get("text") or "" for p in content if p.get("type") == "text")
    return "".join(out)


# --- Arrow ---------------------------------------------------------------------------------------------------------

TOKEN_COLUMNS = ("chosen_token_ids", "chosen_logprobs", "rejected_token_ids", "rejected_logprobs")  # nullable


def pair_schema():
    """The Arrow schema of a pairs file (and of SFT example files)."""
    import pyarrow as pa
    part = pa.struct([("type", pa.string()), ("text", pa.string())])
    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(part))]))
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pair = pa.schema([
        ("pair_id", pa.string()), ("prompt_id", pa.string()), ("kind", pa.string()),
        ("prompt", messages), ("chosen", messages), ("rejected", messages), ("images", pa.list_(image)),
        ("round", pa.int32()), ("policy_version", pa.int32()), ("gold_answer", pa.string()),
        ("chosen_answer", pa.string()), ("rejected_answer", pa.string()),
        ("chosen_correct", pa.bool_()), ("rejected_correct", pa.bool_()), ("ntp_prefix", pa.string()),
        *[(name, pa.list_(pa.int32() if name.endswith("ids") else pa.float32())) for name in TOKEN_COLUMNS],
    ])
    # Tell `datasets` that `images` is a list of Image features, so it decodes them to PIL like any HF image dataset.
    hf = {"info": {"features": {
        "images": {"feature": {"_type": "Image"}, "_type": "Sequence"},
    }}}
    return pair.with_metadata({"huggingface": json.dumps(hf)})


def pair_to_row(p: PreferencePair) -> dict:
    return {
        "pair_id": p.pair_id, "prompt_id": p.prompt_id, "kind": p.kind,
        "prompt": user_message(p.question, len(p.images)),
        "chosen": assistant_message(p.chosen),
        "rejected": assistant_message(p.rejected) if p.rejected is not None else [],
        "images": [{"bytes": b, "path": None} for b in p.images],
        "round": p.round, "policy_version": p.policy_version, "gold_answer": p.gold_answer,
        "chosen_answer": p.chosen_answer, "rejected_answer": p.rejected_answer,
        "chosen_correct": p.chosen_correct, "rejected_correct": p.rejected_correct, "ntp_prefix": p.ntp_prefix,
        **{name: getattr(p, name) for name in TOKEN_COLUMNS},
    }


def row_to_pair(row: dict) -> PreferencePair:
    rejected = row.get("rejected")
    return PreferencePair(
        pair_id=row["pair_id"], prompt_id=row["prompt_id"], kind=row["kind"],
        question=prompt_question(row["prompt"]), images=[im["bytes"] for im in row.get("images") or []],
        chosen=message_text(row["chosen"]), rejected=message_text(rejected) if len(rejected or []) else None,
        round=int(row.get("round") or 0), policy_version=int(row.get("policy_version") or 0),
        gold_answer=row.get("gold_answer"), chosen_answer=row.get("chosen_answer"),
        rejected_answer=row.get("rejected_answer"), chosen_correct=row.get("chosen_correct"),
        rejected_correct=row.get("rejected_correct"), ntp_prefix=row.get("ntp_prefix"),
        **{name: row.get(name) for name in TOKEN_COLUMNS},  # absent in pair files written before these columns
    )


def pairs_to_table(pairs: list[PreferencePair]):
    import pyarrow as pa
    return pa.Table.from_pylist([pair_to_row(p) for p in pairs], schema=pair_schema())


def table_to_pairs(table) -> list[PreferencePair]:
    return [row_to_pair(r) for r in table.to_pylist()]


def write_text_atomic(path, text: str) -> str:
    """Write `text` to `path` via a temp file + rename (a killed write never looks whole). Returns the sha256."""
    import os
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return hashlib.sha256(text.encode()).hexdigest()


def write_parquet_atomic(table, path) -> str:
    """Write `table` to `path` via a temp file + rename (a killed write never looks whole). Returns the sha256."""
    import os

    import pyarrow.parquet as pq
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    os.replace(tmp, path)
    return digest


def openai_messages(question: str, images: list[bytes], *, with_images: bool = True) -> list[dict]:
    """The prompt as OpenAI chat messages (images as PNG data URLs), the form vLLM's `chat` and the Serve app accept."""
    import base64

    def image_url(i: int) -> dict:
        img = images[i]
        kind = "jpeg" if img[:3] == b"\xff\xd8\xff" else "png"
        url = f"data:image/{kind};base64," + base64.b64encode(img).decode()
        return {"type": "image_url", "image_url": {"url": url}}

    if not with_images:
        return [{"role": "user", "content": [{"type": "text", "text": strip_placeholders(question)}]}]
    return [{"role": "user", "content": content_parts(question, len(images), image_url)}]


# config.json keys that name a model's input placeholder tokens (Idefics3, Qwen2.5-VL, LLaVA, ...)
PLACEHOLDER_KEYS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index", "audio_token_id",
                    "audio_token_index")


def input_placeholder_ids(model_dir) -> set[int]:
    """Token ids the model's forward replaces by encoder features (`<image>`, ...), from its config.json: they may
    appear in a prompt, never in a response the trainer scores. Empty for text-only models. (Rollouts drop samples
    holding them; the trainer masks them.)"""
    from pathlib import Path

    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text()) if path.exists() else {}
    return {int(cfg[k]) for k in PLACEHOLDER_KEYS if isinstance(cfg.get(k), int)}
