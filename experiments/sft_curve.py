"""How fast does the tiny default policy learn the synthetic tasks? Held-out greedy accuracy vs. SFT steps.

    python experiments/sft_curve.py [--scale-factor 1] [--n-train 16000] [--epochs 2] [--lr 2e-3] [--eval-every 125]
    python experiments/sft_curve.py --init runs/tiny_cpu/policies/v0000 --steps 25 --lr 2e-4 --eval-every 25
    python experiments/sft_curve.py --init POLICY --tasks artifacts/tasks --rft-from ROUND/rollouts.parquet   # RFT
    python experiments/sft_curve.py --init POLICY --tasks artifacts/tasks --gold-prompts-from ROUND/rollouts.parquet

Sizing the warm start (and explaining what an online round can add) needs the learning curve of plain supervised
fine-tuning on gold demonstrations. This runs it in one process with plain PyTorch AdamW (no Ray, no DeepSpeed: the
same loss and batches as the trainer's SFT objective, fewer moving parts), on a freshly built tiny policy, and prints
held-out greedy CoT accuracy (overall and per level) every `--eval-every` steps. With `--init DIR` it continues an
existing policy instead (e.g. a warm start, to see how far a round-sized gold update moves it); `--steps` caps the
run. Measured results are in docs/experiments.md.
"""

import argparse
import io
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def greedy_accuracy(model, processor, rows: list[dict], max_new_tokens: int = 128) -> dict:
    """Held-out greedy CoT accuracy with Hugging Face generate (batches of 64), overall and per task level."""
    import torch
    from PIL import Image

    from mpo_online.data.records import user_message
    from mpo_online.reward.verify import answers_match, extract_final_answer

    model.eval()
    tok = processor.tokenizer
    tok.padding_side = "left"  # generation continues every row from its last prompt token
    hits: dict = {}
    for i in range(0, len(rows), 64):
        chunk = rows[i:i + 64]
        # the trainer's own prompt layout (image where the question's placeholder puts it)
        texts = [processor.apply_chat_template(user_message(r["question"], len(r["images"])),
                                               add_generation_prompt=True, tokenize=False) for r in chunk]
        images = ([[Image.open(io.BytesIO(r["images"][0])).convert("RGB")] for r in chunk]
                  if all(r["images"] for r in chunk) else None)  # text-only tasks (word problems): no images
        enc = processor(text=texts, images=images, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        for r, ids in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            answer = extract_final_answer(tok.decode(ids, skip_special_tokens=True))
            level = json.loads(r["meta"])["level"]
            hits.setdefault(level, []).append(answer is not None and answers_match(answer, r["answer"]))
    tok.padding_side = "right"
    model.train()
    every = [h for hs in hits.values() for h in hs]
    return {"all": round(sum(every) / len(every), 3),
            **{f"level{k}": round(sum(v) / len(v), 3) for k, v in sorted(hits.items())}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale-factor", type=int, default=1, help="Idefics3 pixel shuffle: 1 = one token per cell")
    p.add_argument("--n-train", type=int, default=16000)
    p.add_argument("--n-heldout", type=int, default=200)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=125)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--init", default=None, help="start from this policy directory instead of a fresh tiny policy")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (the schedule still spans "
                   "--epochs)")
    p.add_argument("--tasks", default=None, help="use this task directory (e.g. artifacts/tasks) instead of "
                   "generating one with --n-train/--n-heldout")
    p.add_argument("--rft-from", default=None, help="train on a round's rollouts.parquet instead of gold chains: "
                   "its correct samples passing --chosen-check (at most 4 distinct per prompt), i.e. RFT")
    p.add_argument("--gold-prompts-from", default=None, help="train on the gold chains (CoT only) of the prompts of "
                   "a round's rollouts.parquet: the control for --rft-from on the same prompts")
    p.add_argument("--chosen-check", default="perceived", choices=("answer", "consistent", "perceived"))
    p.add_argument("--save", default=None, help="save the final policy here (model + processor), e.g. as a warm start")
    a = p.parse_args()
    if (a.rft_from or a.gold_prompts_from) and not a.tasks:
        p.error("--rft-from / --gold-prompts-from need --tasks: the task directory the rollouts' prompt ids come from")

    import torch

    from mpo_online.data.prompts import load_prompts
    from mpo_online.data.records import pairs_to_table
    from mpo_online.pairs import rft_examples
    from mpo_online.synthetic.tasks import write_task_splits
    from mpo_online.synthetic.tiny_model import build_model_dir
    from mpo_online.trainer.batching import PairCollator
    from mpo_online.trainer.logps import load_model, sequence_logps
    from mpo_online.warm_start import sft_examples

    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="sft_curve-"))
    tasks = Path(a.tasks) if a.tasks else work / "tasks"
    if not a.tasks:
        write_task_splits(tasks, a.n_train, a.n_heldout, seed=0, levels=(1, 2))
    model_dir = a.init or str(build_model_dir(work / "model", scale_factor=a.scale_factor))
    train = load_prompts(tasks / "train.parquet")[0]
    heldout = [r for r in load_prompts(tasks / "heldout.parquet")[0] if r["answer"] is not None]
    import pyarrow.parquet as pq
    if a.rft_from:
        examples = rft_examples(pq.read_table(a.rft_from).to_pylist(), {r["id"]: r for r in train},
                                max_per_prompt=4, chosen_check=a.chosen_check)
    elif a.gold_prompts_from:
        ids = set(pq.read_table(a.gold_prompts_from, columns=["prompt_id"]).column("prompt_id").to_pylist())
        examples = sft_examples([r for r in train if r["id"] in ids], cot_instruction="", direct_instruction="",
                                direct_fraction=0.0, seed=0)
    else:
        examples = sft_examples(train, cot_instruction="", direct_instruction=" Answer directly.",
                                direct_fraction=0.25, seed=0)
    rows = pairs_to_table(examples).to_pylist()
    collate = PairCollator.from_pretrained(model_dir, pairs=False, max_length=512)
    model = load_model(model_dir)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    per_epoch = len(rows) // a.batch
    total, step, t0 = a.epochs * per_epoch, 0, time.time()
    stop = min(total, a.steps or total)
    print(json.dumps({"init": a.init, "scale_factor": a.scale_factor, "n_train": a.n_train, "lr": a.lr,
                      "examples": len(rows), "rft_from": a.rft_from,
                      "gold_prompts_from": a.gold_prompts_from, "steps": stop}), flush=True)
    if a.init:
        print(json.dumps({"step": 0, "heldout_greedy_acc": greedy_accuracy(model, collate.processor, heldout)}))
    for epoch in range(a.epochs):
        random.Random(epoch).shuffle(rows)
        for i in range(per_epoch):
            batch = collate(rows[i * a.batch:(i + 1) * a.batch]).tensors
            for g in opt.param_groups:  # 10-step warm-up, then linear decay to 0 over the whole run
                g["lr"] = a.lr * min(1.0, (step + 1) / 10) * max(0.0, 1.0 - step / total)
            sum_logps, _, n_tokens = sequence_logps(model, batch)
            loss = -(sum_logps.sum() / n_tokens.sum())  # token-mean NLL, as the trainer's SFT objective
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % a.eval_every == 0 or step == stop:
                acc = greedy_accuracy(model, collate.processor, heldout)
                print(json.dumps({"step": step, "epoch": round(step / per_epoch, 2), "loss": round(loss.item(), 4),
                                  "heldout_greedy_acc": acc, "seconds": round(time.time() - t0)}), flush=True)
            if step == stop:
                if a.save:  # the init policy's side files (processor, serving metadata), then the new weights
                    if a.init:
                        shutil.copytree(a.init, a.save, dirs_exist_ok=True)
                    else:
                        collate.processor.save_pretrained(a.save)
                    model.save_pretrained(a.save)
                return


if __name__ == "__main__":
    main()
