"""Input checks shared by the HTTP ingress and the handle path: images, prompt size, sampling and token fields.

Pure functions over plain Python data (no Ray, no vLLM), so they are unit-testable and cheap. Each failure raises
`InputError(status, message, param)`; the ingress turns it into an OpenAI-style error body with that status, the
handle path (`generate_batch`) puts the message in the request's `error` field.

Why check here rather than leave it to vLLM: vLLM rejects some of these itself, but with messages that mention its
internals (or a 500 for an undecodable image), and it would fetch remote `http(s)://` image URLs — this server only
accepts inline `data:` URLs, since it has no business making outbound requests on a client's behalf.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any

MAX_IMAGE_PIXELS = 4096 * 4096  # decoded size cap: a small PNG can declare a huge canvas (decompression bomb)
# the roles every chat template served here renders (SmolVLM's, SmolLM2's ChatML, the tiny policy's); anything else
# ("tool", "wizard") would be rendered as something the model was never trained on, or dropped by the template
CHAT_ROLES = ("system", "user", "assistant")
IMAGE_PLACEHOLDER = "<image>"


class InputError(ValueError):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 8_000
    max_image_bytes: int = 4_000_000
    max_model_len: int = 512
    max_n: int = 64


def decode_image_bytes(data: bytes, max_bytes: int, param: str = "image"):
    """Raw encoded image bytes (PNG, JPEG, ...) -> RGB PIL image, or InputError (413 too big, 400 undecodable)."""
    from PIL import Image

    if len(data) > max_bytes:
        raise InputError(413, f"image is {len(data)} bytes; the limit is {max_bytes}", param)
    try:
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
            if w * h > MAX_IMAGE_PIXELS:
                raise InputError(413, f"image is {w}x{h} pixels; the limit is {MAX_IMAGE_PIXELS} pixels", param)
            probe.verify()  # cheap integrity check; verify() leaves the image unusable, so reopen below
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except InputError:
        raise
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise InputError(400, f"image could not be decoded: {type(exc).__name__}: {exc}", param) from None


def decode_data_url(url: str, max_bytes: int, param: str = "image_url"):
    """`data:image/<fmt>;base64,<payload>` -> PIL image. Any other URL scheme is refused."""
    if not isinstance(url, str) or not url.startswith("data:"):
        shown = url[:40] + "..." if isinstance(url, str) and len(url) > 40 else url
        raise InputError(400, f"only inline data: URLs are accepted for images (got {shown!r})", param)
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header or not header[5:].startswith("image/"):
        raise InputError(400, "image data URL must look like data:image/<format>;base64,<data>", param)
    if len(payload) * 3 // 4 > max_bytes + 3:  # reject before decoding a huge payload
        raise InputError(413, f"image is about {len(payload) * 3 // 4} bytes; the limit is {max_bytes}", param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(400, "image data URL payload is not valid base64", param) from None
    return decode_image_bytes(data, max_bytes, param)


def check_messages(messages: Any, limits: Limits) -> None:
    """Validate OpenAI-style chat messages: structure, total text length, and every image part."""
    if not isinstance(messages, list) or not messages:
        raise InputError(400, "messages must be a non-empty list", "messages")
    chars = 0
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in CHAT_ROLES:
            raise InputError(400, f"unsupported role {role!r} (this server takes {', '.join(CHAT_ROLES)})",
                             f"messages[{i}].role")
        content = msg.get("content")
        if isinstance(content, str):
            chars += len(content)
            continue
        images = slots = 0
        for j, part in enumerate(content or []):
            kind = part.get("type") if isinstance(part, dict) else None
            where = f"messages[{i}].content[{j}]"
            images += kind in ("image_url", "image")
            if kind == "text":
                chars += len(part.get("text") or "")
                slots += (part.get("text") or "").count(IMAGE_PLACEHOLDER)
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                decode_data_url(url, limits.max_image_bytes, where)
            elif kind == "image":
                img = part.get("image")
                if not isinstance(img, (bytes, bytearray)):
                    raise InputError(400, "an 'image' part must carry the encoded image bytes", where)
                decode_image_bytes(bytes(img), limits.max_image_bytes, where)
            else:
                raise InputError(400, f"unsupported content part type {kind!r} (text, image_url, image)", where)
        # placeholders are optional (the template places the images); when the text has them, each image needs one
        if slots and slots != images:
            raise InputError(400, f"message has {images} image(s) for {slots} {IMAGE_PLACEHOLDER} placeholder(s)",
                             f"messages[{i}].content")
    check_prompt_chars(chars, limits)


def check_prompt_chars(chars: int, limits: Limits) -> None:
    if chars > limits.max_prompt_chars:
        raise InputError(400, f"prompt has {chars} characters; the limit is {limits.max_prompt_chars}", "messages")


def check_completion_prompt(prompt: Any, limits: Limits) -> None:
    prompts = prompt if isinstance(prompt, list) else [prompt]
    if not prompts:
        raise InputError(400, "prompt must not be empty", "prompt")
    for p in prompts:
        if isinstance(p, str):
            check_prompt_chars(len(p), limits)
        elif isinstance(p, list) and all(isinstance(t, int) for t in p):
            if len(p) > limits.max_model_len:
                raise InputError(400, f"prompt has {len(p)} tokens; the limit is {limits.max_model_len}", "prompt")
        else:
            raise InputError(400, "prompt must be a string, a list of strings, or a list of token ids", "prompt")


def check_sampling(params: dict, limits: Limits) -> None:
    """OpenAI sampling ranges plus this server's caps. `params` holds only the fields the client set (None = unset)."""
    t = params.get("temperature")
    if t is not None and not 0.0 <= t <= 2.0:
        raise InputError(400, f"temperature must be in [0, 2] (got {t})", "temperature")
    p = params.get("top_p")
    if p is not None and not 0.0 < p <= 1.0:
        raise InputError(400, f"top_p must be in (0, 1] (got {p})", "top_p")
    n = params.get("n")
    if n is not None and not 1 <= n <= limits.max_n:
        raise InputError(400, f"n must be in [1, {limits.max_n}] (got {n})", "n")
    for key in ("max_tokens", "max_completion_tokens"):
        m = params.get(key)
        if m is not None and not 1 <= m <= limits.max_model_len:
            raise InputError(400, f"{key} must be in [1, {limits.max_model_len}] (the context length); got {m}", key)
    seed = params.get("seed")
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**63):
        raise InputError(400, f"seed must be a non-negative integer (got {seed})", "seed")


def check_token_fields(req: dict, limits: Limits) -> None:
    """The handle path's token-level fields: `logprobs` and `return_prompt_token_ids` (booleans) and
    `assistant_prefix_token_ids` (token ids appended after the rendered chat prompt; needs `messages`)."""
    for key in ("logprobs", "return_prompt_token_ids"):
        if req.get(key) is not None and not isinstance(req[key], bool):
            raise InputError(400, f"{key} must be true or false (got {req[key]!r})", key)
    ids = req.get("assistant_prefix_token_ids")
    if ids is None:
        return
    key = "assistant_prefix_token_ids"
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise InputError(400, f"{key} must be a list of non-negative integer token ids", key)
    if len(ids) > limits.max_model_len:
        raise InputError(400, f"{key} has {len(ids)} tokens; the limit is {limits.max_model_len}", key)
    if "messages" not in req:
        raise InputError(400, f"{key} continues a chat prompt: the request needs 'messages'", key)
