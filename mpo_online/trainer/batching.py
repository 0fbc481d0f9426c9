"""Turn pair rows (mpo_online.data.records pair schema) into model inputs with prompt-masked labels.

    collate = PairCollator.from_pretrained(policy_dir, max_length=512, pairs=True)
    batch = collate(rows)          # rows: list of dicts in the pair schema (e.g. a pyarrow batch's to_pylist())
    batch.tensors                  # input_ids / attention_mask / labels (S, T) + processor outputs (pixel_values, ...)

Used inside the Ray Train workers (mpo_online.trainer.worker) and by tests; nothing here knows about Ray.

Layout. For B pairs the batch holds S = 2B sequences, chosen first then rejected (rows i and B + i share the prompt
and the images); with `pairs=False` (SFT / RFT) only the B chosen sequences. Each sequence is
`prompt tokens + response tokens`, right-padded:

- The prompt is the model's chat template applied to the `prompt` messages with add_generation_prompt=True, run
  through the processor together with the row's images (so image placeholders expand to the model's image tokens).
- The response, when the row carries its token ids (`chosen_token_ids` / `rejected_token_ids` non-empty: responses
  the engine sampled, mpo_online.data.records): those ids verbatim. They are what the engine sampled, special tokens
  included, and end with the end-of-turn token only if the engine sampled one (a response cut off by the token limit
  gets none appended), so the trainer scores exactly the sampled sequence. A response id that is an input
  placeholder (`<image>`) is refused: the model's forward would take it for an image slot.
- The response, for rows without ids (gold demonstrations, SFT rows, older pair files): the rest of the templated
  full conversation (prompt + the one assistant message), i.e. the text after the templated prompt, which must be
  a prefix of it (checked). It is tokenized on its own and appended, so the prompt/response boundary is exact even
  for BPE tokenizers that would merge across it. Targets run up to and including the end-of-turn token (the
  tokenizer's eos, e.g. `<end_of_utterance>` or `<|im_end|>`); template text after it (a trailing newline) is
  dropped; if the template emits no end-of-turn token, the eos is appended.
- Targets (`labels` != -100) are the response tokens; prompt, image and padding positions are -100.
- `max_length` bounds prompt + response; only the response is cut (at least one response token is kept).
- `pref_span="first_diff_line"` (pairs only) adds `score_mask` (S, T): the tokens a pair's preference rewards sum
  over, the line where chosen and rejected first differ (`preference_spans`), instead of the whole response;
  `"first_diff_token"`: only the first token where they differ (`first_diff_token_spans`).
  `sequence_logps` sums over it; the SFT term's NLL still covers the whole chosen response.

Works with a multimodal processor (Idefics3/SmolVLM: pixel_values (S, n_images, 3, H, W); Qwen2.5-VL: flattened
patches + image_grid_thw) because the processor sees all S prompts in one call and its image outputs are passed to
the model untouched; and with a plain tokenizer (text-only models: image parts are dropped, content flattened to
text so any text chat template works).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from dataclasses import dataclass, field

from mpo_online.data.records import input_placeholder_ids

IGNORE_INDEX = -100


@dataclass
class PairBatch:
    """One micro-batch: model inputs + labels, and which pairs it holds."""
    tensors: dict  # input_ids (S, T), attention_mask (S, T), labels (S, T), + processor outputs
    n_pairs: int  # B; S = 2B when has_rejected else B
    has_rejected: bool
    keys: list = field(default_factory=list)  # (B,) stable pair keys (pair_id or a content hash)
    spans: list | None = None  # (S,) response-token [start, end) the rewards cover (pref_span); None: all

    @property
    def num_tokens(self) -> int:
        """Non-padding input tokens over all S sequences (prompt + image + response)."""
        return int(self.tensors["attention_mask"].sum())

    def to(self, device, float_dtype=None) -> PairBatch:
        """Move tensors to `device`; floating tensors (pixel_values) to `float_dtype` when given."""
        out = {}
        for k, v in self.tensors.items():
            if hasattr(v, "to"):
                v = v.to(device)
                if float_dtype is not None and v.is_floating_point():
                    v = v.to(float_dtype)
            out[k] = v
        return PairBatch(out, self.n_pairs, self.has_rejected, list(self.keys), self.spans)


def load_processor(model_dir):
    """AutoProcessor for multimodal checkpoints; for text-only ones this resolves to the tokenizer."""
    from transformers import AutoProcessor, AutoTokenizer
    try:
        return AutoProcessor.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError):
        return AutoTokenizer.from_pretrained(model_dir)


def row_key(row: dict) -> str:
    """The pair's stable key: its pair_id, else a hash of its messages and images."""
    if row.get("pair_id"):
        return str(row["pair_id"])
    h = hashlib.sha256(json.dumps([row.get("prompt"), row.get("chosen"), row.get("rejected")],
                                  sort_keys=True, default=str).encode())
    for im in row.get("images") or []:
        h.update(im.get("bytes") or (im.get("path") or "").encode())
    return h.hexdigest()[:20]


def decode_images(images) -> list:
    """Pair-schema image entries ({bytes, path}) -> RGB PIL images."""
    from PIL import Image
    out = []
    for im in images or []:
        if im.get("bytes"):
            img = Image.open(io.BytesIO(im["bytes"]))
        elif im.get("path"):
            img = Image.open(im["path"])
        else:
            raise ValueError("image entry has neither bytes nor path")
        out.append(img.convert("RGB"))
    return out


def _flatten_content(messages: list) -> list:
    """Content lists -> plain strings (text parts joined), for text-only chat templates."""
    out = []
    for m in messages:
        c = m["content"]
        if not isinstance(c, str):
            c = "".join(p.get("text") or "" for p in c if p.get("type") == "text")
        out.append({"role": m["role"], "content": c})
    return out


def _clean(messages) -> list:
    """Arrow round-trips give each part every struct field (an image part carries text=None); keep what is set."""
    out = []
    for m in messages or []:
        c = m["content"]
        if not isinstance(c, str):
            c = [{k: v for k, v in p.items() if v is not None or k == "type"} for p in c]
        out.append({"role": m["role"], "content": c})
    return out


PREF_SPANS = ("sequence", "first_diff_line", "first_diff_token")


def first_difference(chosen: list[int], rejected: list[int]) -> int:
    """The first position where two token lists differ (the shorter one's length if one is a prefix of the other)."""
    n = min(len(chosen), len(rejected))
    return next((i for i in range(n) if chosen[i] != rejected[i]), n)


def first_diff_token_spans(chosen: list[int], rejected: list[int]) -> tuple[tuple, tuple]:
    """The first token where two responses differ, as [start, end) in each response's tokens (empty for a response
    that ended before it). The shared prefix is the same context for both, so this single token is the whole
    decision the pair disagrees on first: in a scan-and-tally chain, one cell read two ways. Nothing after it (the
    rejected chain's copying and arithmetic that follow from its misreading) is pushed down."""
    d = first_difference(chosen, rejected)
    return (d, min(d + 1, len(chosen))), (d, min(d + 1, len(rejected)))


def preference_spans(chosen: list[int], rejected: list[int], newline_ids) -> tuple[tuple, tuple]:
    """The line where two responses first differ, as [start, end) in each response's tokens.

    start: just after the last newline token before the first differing position (the shared prefix up to there is
    the same in both, with the same context, so its log-probs would cancel in the DPO margin anyway); end: through
    the first newline at or after that position in each response (or its end). In a scan-and-tally chain this is
    the first line whose reading differs: a preference over it does not also push down the later lines of the
    rejected chain (the correct copying and arithmetic that follow from its misreading)."""
    d = first_difference(chosen, rejected)
    start = max((i + 1 for i in range(d) if chosen[i] in newline_ids), default=0)

    def end(ids):
        return next((i + 1 for i in range(d, len(ids)) if ids[i] in newline_ids), len(ids))
    return (start, end(chosen)), (start, end(rejected))


class PairCollator:
    """rows -> PairBatch. See the module docstring for the layout."""

    def __init__(self, processor, *, max_length: int = 512, pairs: bool = True, eos_token_ids=None,
                 placeholder_ids=(), pref_span: str = "sequence"):
        if pref_span not in PREF_SPANS:
            raise ValueError(f"pref_span must be one of {PREF_SPANS}, got {pref_span!r}")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.multimodal = hasattr(processor, "image_processor")
        self.max_length = int(max_length)
        self.pairs = pairs
        self.placeholder_ids = set(placeholder_ids)
        eos = set(eos_token_ids or [])
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        if not eos:
            raise ValueError("the tokenizer has no eos token and no eos_token_ids were given")
        self.eos_ids = eos
        self.append_eos_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else min(eos)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.append_eos_id
        self.pref_span = pref_span if pairs else "sequence"
        self.newline_ids: set[int] = set()
        # (chosen ids, rejected ids) -> (chosen span, rejected span); None: rewards over the whole response
        self.span_of = None
        if self.pref_span == "first_diff_line":  # every token whose text holds a line break
            vocab = len(self.tokenizer)
            texts = self.tokenizer.batch_decode([[i] for i in range(vocab)])
            self.newline_ids = {i for i, t in enumerate(texts) if "\n" in t}
            self.span_of = functools.partial(preference_spans, newline_ids=self.newline_ids)
        elif self.pref_span == "first_diff_token":
            self.span_of = first_diff_token_spans

    @classmethod
    def from_pretrained(cls, model_dir, **kwargs) -> PairCollator:
        """Processor from `model_dir`; end-of-turn ids also from its generation_config.json when present; input
        placeholder ids from its config.json."""
        eos = []
        try:
            from transformers import GenerationConfig
            e = GenerationConfig.from_pretrained(model_dir).eos_token_id
            eos = [e] if isinstance(e, int) else list(e or [])
        except (OSError, ValueError):
            pass
        kwargs.setdefault("placeholder_ids", input_placeholder_ids(model_dir))
        return cls(load_processor(model_dir), eos_token_ids=kwargs.pop("eos_token_ids", None) or eos, **kwargs)

    # --- templating --------------------------------------------------------------------------------------------

    def _template(self, messages, *, add_generation_prompt: bool) -> str:
        msgs = _clean(messages) if self.multimodal else _flatten_content(_clean(messages))
        return self.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)

    def texts(self, prompt, response) -> tuple[str, str]:
        """(templated prompt ending in the generation prompt, the response text that follows it)."""
        prompt_text = self._template(prompt, add_generation_prompt=True)
        full_text = self._template(list(prompt) + list(response), add_generation_prompt=False)
        if not full_text.startswith(prompt_text):
            raise ValueError("the chat template does not render the prompt (with add_generation_prompt=True) as a "
                             f"prefix of the full conversation:\nprompt: {prompt_text!r}\nfull:   {full_text!r}")
        return prompt_text, full_text[len(prompt_text):]

    def _sampled_ids(self, row: dict, which: str) -> list[int] | None:
        """The response's sampled token ids (`<which>_token_ids`), or None when the row has none (text path)."""
        ids = row.get(f"{which}_token_ids")
        if ids is None or not len(ids):
            return None
        ids = [int(t) for t in ids]
        if self.placeholder_ids.intersection(ids):
            raise ValueError(f"pair {row_key(row)}: the {which} token ids hold an input placeholder token "
                             f"({sorted(self.placeholder_ids.intersection(ids))}); such a response cannot be scored")
        return ids

    def _response_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ends = [i for i, t in enumerate(ids) if t in self.eos_ids]
        if ends:
            return ids[: ends[-1] + 1]  # through the end-of-turn token; trailing template text is not a target
        return ids + [self.append_eos_id]

    # --- batching ----------------------------------------------------------------------------------------------

    def __call__(self, rows: list[dict]) -> PairBatch:
        import torch

        if not rows:
            raise ValueError("empty batch")
        B = len(rows)
        which = ["chosen"] * B
        if self.pairs:
            for r in rows:
                if not len(r.get("rejected") or []):
                    raise ValueError(f"pair {row_key(r)} has no rejected response (use pairs=False for SFT rows)")
            which += ["rejected"] * B
        src = list(range(B)) + (list(range(B)) if self.pairs else [])  # sequence s comes from row src[s]
        prompt_texts, resp_ids = [], []  # (S,) templated prompts and response token ids
        for s, w in enumerate(which):
            row = rows[src[s]]
            ids = self._sampled_ids(row, w)
            if ids is None:  # text path: tokenize the templated response (EOS rule in the module docstring)
                p, t = self.texts(row["prompt"], row[w])
                ids = self._response_ids(t)
            else:
                p = self._template(row["prompt"], add_generation_prompt=True)
            prompt_texts.append(p)
            resp_ids.append(ids)

        # Prompts (+ images) through the processor in one call: S sequences.
        extra, per_token = {}, {}
        if self.multimodal:
            images = [decode_images(rows[i].get("images")) for i in src]
            kw = {"images": images} if any(images) else {}
            enc = self.processor(text=prompt_texts, return_tensors="pt", padding=True, add_special_tokens=False,
                                 **kw)
            mask = enc["attention_mask"].bool()  # (S, T_p), padding side as the tokenizer likes
            prompt_ids = [enc["input_ids"][s][mask[s]].tolist() for s in range(len(src))]
            for k, v in enc.items():
                if k in ("input_ids", "attention_mask"):
                    continue
                if hasattr(v, "shape") and v.dim() == 2 and tuple(v.shape) == tuple(mask.shape):
                    # Per-token side inputs (e.g. Qwen2.5-VL's mm_token_type_ids): the prompt's values, then 0
                    # ("text") for the response and padding; rebuilt below once T is known.
                    per_token[k] = [v[s][mask[s]] for s in range(len(src))]
                else:
                    extra[k] = v  # image tensors (pixel_values, pixel_attention_mask, image_grid_thw, ...)
        else:
            prompt_ids = self.tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]

        seqs, n_prompt = [], []
        for s in range(len(src)):
            p = list(prompt_ids[s])
            r = resp_ids[s][: max(1, self.max_length - len(p))]  # cut the response side only
            seqs.append(p + r)
            n_prompt.append(len(p))

        T = max(len(x) for x in seqs)
        S = len(seqs)
        input_ids = torch.full((S, T), self.pad_id, dtype=torch.long)       # (S, T)
        attention_mask = torch.zeros((S, T), dtype=torch.long)              # (S, T)
        labels = torch.full((S, T), IGNORE_INDEX, dtype=torch.long)         # (S, T)
        for s, ids in enumerate(seqs):
            input_ids[s, : len(ids)] = torch.tensor(ids)
            attention_mask[s, : len(ids)] = 1
            labels[s, n_prompt[s]: len(ids)] = torch.tensor(ids[n_prompt[s]:])
        for k, vals in per_token.items():
            full = torch.zeros((S, T), dtype=vals[0].dtype)                  # (S, T)
            for s, v in enumerate(vals):
                full[s, : len(v)] = v
            extra[k] = full
        tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **extra}
        spans = None
        if self.span_of is not None:
            spans = [None] * S
            for j in range(B):
                spans[j], spans[B + j] = self.span_of(resp_ids[j], resp_ids[B + j])
            score_mask = torch.zeros((S, T), dtype=torch.bool)              # (S, T)
            for s, (a, b) in enumerate(spans):
                kept = len(seqs[s]) - n_prompt[s]   # response tokens left after the max_length cut
                score_mask[s, n_prompt[s] + min(a, kept): n_prompt[s] + min(b, kept)] = True
            tensors["score_mask"] = score_mask
        return PairBatch(tensors, n_pairs=B, has_rejected=self.pairs, keys=[row_key(r) for r in rows], spans=spans)
