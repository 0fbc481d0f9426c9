"""Per-token and per-sequence response log-probs without materialising the (tokens, vocab) logits; model loading.

    logps = token_logps(model, batch.tensors, chunk_size=1024)     # (S, T): log p(input_ids[s, t] | < t) on targets
    sum_logps, mean_nll, n_tokens = sequence_logps(model, batch.tensors, chunk_size=1024)   # each (S,)

The model runs only up to its last hidden state (the base model, `getattr(model, model.base_model_prefix)`: e.g.
Idefics3Model, Qwen2_5_VLModel, LlamaModel); the lm-head is applied only at target positions through
`mpo_online.trainer.losses.fused_token_logps`, chunk by chunk. Used for every policy log-prob (training forward, with
grad) and every reference log-prob (no grad) in mpo_online.trainer.worker; `PolicyLogps` wraps a Hugging Face model so
that DeepSpeed's engine forward (and ZeRO-3's parameter hooks) run around it.

ZeRO-3 note: the lm-head weight is read through a call of the lm-head *module* (its forward temporarily swapped for
the fused log-prob), so ZeRO-3's module hooks gather the partitioned weight for forward and backward and reduce its
gradient as usual; reading `lm_head.weight` outside a module call would see an empty partition.
"""

from __future__ import annotations

import torch

from mpo_online.trainer.batching import IGNORE_INDEX
from mpo_online.trainer.losses import fused_token_logps


def _check_head(model) -> torch.nn.Module:
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise NotImplementedError(f"{type(model).__name__} has no linear output embedding (lm-head)")
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("an lm-head with a bias is not supported by the fused log-prob")
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"models with {attr} (logits post-processing) are not supported")
    return head


def _head_token_logps(head: torch.nn.Module, hidden, labels, chunk_size: int):
    """fused_token_logps(hidden (N, H), head.weight (V, H), labels (N,)) -> (N,), as a call of the head module."""
    head.forward = lambda h, y: fused_token_logps(h, head.weight, y, chunk_size=chunk_size)  # instance override
    try:
        return head(hidden, labels)
    finally:
        del head.forward  # back to the class's forward


def token_logps(model, batch: dict, chunk_size: int = 1024):
    """Log-prob of every target token, laid out like the labels.

    Args:
        model: a Hugging Face *ForCausalLM / *ForConditionalGeneration model.
        batch: input_ids (S, T), attention_mask (S, T), labels (S, T) with IGNORE_INDEX on non-targets, plus any
            processor outputs the model takes (pixel_values, ...). Label t is predicted from position t - 1.
        chunk_size: rows per (chunk, V) logits buffer in the fused lm-head.
    Returns:
        (S, T) fp32 tensor: entry [s, t] = log p(labels[s, t] | tokens < t) where labels[s, t] is a target, 0
        elsewhere (prompt, image, padding, and position 0). Differentiable w.r.t. the model's parameters.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]                                             # (S, T)
    head = _check_head(model)
    base = getattr(model, model.base_model_prefix)
    out = base(**inputs, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]   # (S, T, H)
    targets = labels[:, 1:]                                              # (S, T-1): token t+1 is predicted at t
    mask = targets != IGNORE_INDEX                                       # (S, T-1)
    h = hidden[:, :-1][mask]                                             # (N, H) target positions only
    y = targets[mask]                                                    # (N,)
    tok = _head_token_logps(head, h, y, chunk_size)                      # (N,) fp32
    # Scatter back to label positions: column t + 1 of `labels` is the target predicted at hidden position t.
    full_mask = torch.nn.functional.pad(mask, (1, 0), value=False)       # (S, T)
    logps = torch.zeros(labels.shape, dtype=tok.dtype, device=tok.device)  # (S, T)
    return logps.masked_scatter(full_mask, tok)


def sequence_logps(model, batch: dict, chunk_size: int = 1024):
    """Summed response log-prob, token-mean NLL and number of target tokens per sequence (from `token_logps`).

    Returns:
        sum_logps (S,) fp32: sum over targets of log p(token) (over the batch's `score_mask` only, when it has one:
        the preference span, see batching.preference_spans); mean_nll (S,) = -(sum over all targets) / n_tokens
        (0 when a sequence has no targets); n_tokens (S,) int64.
    """
    score_mask = batch.get("score_mask")                                 # (S, T) bool or None
    logps = token_logps(model, {k: v for k, v in batch.items() if k != "score_mask"}, chunk_size)  # (S, T)
    full = logps.sum(dim=1)                                              # (S,)
    n_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)       # (S,)
    mean_nll = -full / n_tokens.clamp(min=1).to(full.dtype)              # (S,)
    sum_logps = full if score_mask is None else (logps * score_mask).sum(dim=1)   # (S,)
    return sum_logps, mean_nll, n_tokens


class PolicyLogps(torch.nn.Module):
    """nn.Module wrapper: forward(batch) -> sequence_logps(self.model, batch). What DeepSpeed wraps."""

    def __init__(self, model, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = int(chunk_size)

    def forward(self, batch: dict):
        return sequence_logps(self.model, batch, self.chunk_size)


def model_class(model_dir):
    """The class the checkpoint was saved from (config.architectures[0]), else an Auto class."""
    import transformers
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(model_dir)
    for arch in getattr(cfg, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    if hasattr(cfg, "vision_config"):
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def load_model(model_dir, *, dtype=None, device=None):
    """Load a checkpoint dir for training or scoring. Dropout is disabled (eval mode) everywhere: policy and
    reference log-probs then come from the same deterministic forward, as DPO-style trainers do."""
    import torch as _t
    model = model_class(model_dir).from_pretrained(model_dir, dtype=dtype or _t.float32)
    if device is not None:
        model = model.to(device)
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model
