"""The data order of a training call on the session's workers: which rows each worker sees at each micro-batch tick.

A micro-batch is padded to its longest sequence, and at every tick the workers wait for the slowest of them (the
gradient all-reduce), so a tick costs about the tick's longest sequence x world x micro_batch. A plain shuffle
mixes short rows (direct answers, image-free text drills) with long ones (an image + a worked chain): on the warm
start 22% of the padded positions were padding. `length_grouped_shards` shuffles with the seed, sorts windows of
WINDOW_TICKS ticks by a grouping key, cuts each window into ticks and shuffles the ticks, so a tick holds similar
rows while the order of steps stays random (the idea of Hugging Face's length-grouped sampler; our own code).

Grouping keys (GROUP_BY, config trainer.group_by): "length" (image count, then text length: least padding, but a
tick then holds one kind of demonstration only: direct answers, text drills or image chains), "images" (image count
only: image-free rows apart from the rest, which stay mixed), "none" (a seeded shuffle).

Used by mpo_online.trainer.session.TrainerSession.train; pure (tests/test_ordering.py).
"""

from __future__ import annotations

import random

from mpo_online.data.records import message_text

GROUP_BY = ("length", "images", "none")
WINDOW_TICKS = 16


def _chars(value) -> int:
    """Text characters of a pair-schema field: a string or a message list (images not counted)."""
    return len(value) if isinstance(value, str) else len(message_text(value or []))


def row_length(row: dict) -> tuple[int, int]:
    """Sort key standing in for a row's padded length: (images, prompt characters + the longer response).

    A response is measured by its sampled token ids when the row has them, else by its characters; only the order
    within one call matters, and one call's rows are all of one kind."""
    def response(name: str) -> int:
        ids = row.get(f"{name}_token_ids")
        return len(ids) if ids is not None else _chars(row.get(name))
    return len(row.get("images") or []), _chars(row.get("prompt")) + max(response("chosen"), response("rejected"))


def length_grouped_shards(rows: list, *, world: int, micro_batch_size: int, seed: int, group_by: str = "length",
                          window_ticks: int = WINDOW_TICKS) -> list[list]:
    """-> one shard per worker; worker w's k-th micro-batch is its rows [k*micro_batch_size, (k+1)*micro_batch_size).

    Every shard gets len(rows) // world rows (the last < world rows are dropped, as Ray's equal split does). Rows
    that do not fill a whole tick (world x micro_batch_size) come last, split equally. group_by "none" or
    window_ticks 0: no sorting (a seeded shuffle only)."""
    if world < 1 or micro_batch_size < 1 or window_ticks < 0 or group_by not in GROUP_BY:
        raise ValueError(f"world ({world}) and micro_batch_size ({micro_batch_size}) must be >= 1, window_ticks "
                         f"({window_ticks}) >= 0, group_by ({group_by!r}) one of {GROUP_BY}")
    key = row_length if group_by == "length" else lambda r: len(r.get("images") or [])
    rows = list(rows)
    rng = random.Random(seed)
    rng.shuffle(rows)
    tick = world * micro_batch_size
    full = len(rows) // tick * tick
    if window_ticks and group_by != "none":
        window = window_ticks * tick
        ticks = []
        for start in range(0, full, window):
            ordered = sorted(rows[start:min(start + window, full)], key=key)  # stable: ties stay shuffled
            ticks += [ordered[i:i + tick] for i in range(0, len(ordered), tick)]
        rng.shuffle(ticks)  # or every window would run from its shortest tick to its longest
    else:
        ticks = [rows[i:i + tick] for i in range(0, full, tick)]
    shards: list[list] = [[] for _ in range(world)]
    for t in ticks:
        for w in range(world):
            shards[w] += t[w * micro_batch_size:(w + 1) * micro_batch_size]
    rest = rows[full:]
    per = len(rest) // world
    for w in range(world):
        shards[w] += rest[w * per:(w + 1) * per]
    return shards
