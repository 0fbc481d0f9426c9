"""Unit tests of the training calls' data order (mpo_online/trainer/ordering.py): pure logic, no Ray."""

from __future__ import annotations

import pytest

from mpo_online.trainer.ordering import length_grouped_shards, row_length


def _rows(lengths):
    return [{"pair_id": f"r{i}", "prompt": "q", "chosen": "x" * n, "rejected": None, "images": []}
            for i, n in enumerate(lengths)]


def _ticks(shards, mb):
    """tick k = every worker's k-th micro-batch."""
    n = len(shards[0]) // mb
    return [[row for s in shards for row in s[k * mb:(k + 1) * mb]] for k in range(n)]


def test_row_length_prefers_token_ids_and_counts_images_first():
    """chosen 'abc' (3 chars) but 5 sampled ids -> 1 + 5; an image sorts after any image-free row."""
    assert row_length({"prompt": "q", "chosen": "abc", "chosen_token_ids": [1, 2, 3, 4, 5], "rejected": "ab",
                       "images": []}) == (0, 6)
    assert row_length({"prompt": "q", "chosen": "a", "images": [b"png"]}) > row_length({"prompt": "q" * 99,
                                                                                        "chosen": "a" * 99})
    # the pair schema's message lists: text parts counted, image parts not
    msgs = [{"role": "user", "content": [{"type": "text", "text": "How many?"}, {"type": "image", "text": None}]}]
    answer = [{"role": "assistant", "content": [{"type": "text", "text": "Final answer: 3"}]}]
    assert row_length({"prompt": msgs, "chosen": answer, "rejected": None, "images": [b"png"]}) == (1, 9 + 15)


def test_every_row_once_equal_shards_and_the_remainder_split_last():
    """10 rows, 2 workers x micro-batch 2: 2 full ticks (8 rows), the 2 left over go one to each shard, last."""
    rows = _rows(range(10))
    shards = length_grouped_shards(rows, world=2, micro_batch_size=2, seed=3, window_ticks=2)
    assert [len(s) for s in shards] == [5, 5]
    ids = [r["pair_id"] for s in shards for r in s]
    assert sorted(ids) == sorted(r["pair_id"] for r in rows)
    # 11 rows: one is dropped (Ray's equal split gives 11 // 2 rows to each worker)
    assert [len(s) for s in length_grouped_shards(_rows(range(11)), world=2, micro_batch_size=2, seed=3)] == [5, 5]


def test_ticks_hold_rows_of_one_length_and_the_order_is_seeded():
    """Lengths 1 and 100 alternating, 32 rows, ticks of 2 x 2 = 4, one window of 8 ticks: a sorted window cuts into
    4 ticks of 1s and 4 of 100s, so every tick is uniform (a plain shuffle mixes them: padding)."""
    rows = _rows([1, 100] * 16)
    shards = length_grouped_shards(rows, world=2, micro_batch_size=2, seed=0, window_ticks=8)
    ticks = _ticks(shards, 2)
    assert len(ticks) == 8
    assert all(len({len(r["chosen"]) for r in t}) == 1 for t in ticks)
    assert sorted(len(t[0]["chosen"]) for t in ticks) == [1] * 4 + [100] * 4
    plain = _ticks(length_grouped_shards(rows, world=2, micro_batch_size=2, seed=0, group_by="none"), 2)
    assert any(len({len(r["chosen"]) for r in t}) == 2 for t in plain)
    # the same seed gives the same order; another seed another
    again = length_grouped_shards(rows, world=2, micro_batch_size=2, seed=0, window_ticks=8)
    other = length_grouped_shards(rows, world=2, micro_batch_size=2, seed=1, window_ticks=8)
    assert again == shards and other != shards


def test_grouping_by_images_keeps_image_free_rows_apart_and_the_rest_mixed():
    """16 image-free rows (length 5) and 16 with an image (lengths 1 and 100 alternating), ticks of 4, one window:
    every tick is all image-free or all with an image, and the image ticks still mix lengths 1 and 100."""
    rows = _rows([5] * 16) + [{**r, "images": [b"png"]} for r in _rows([1, 100] * 8)]
    ticks = _ticks(length_grouped_shards(rows, world=2, micro_batch_size=2, seed=0, group_by="images",
                                         window_ticks=8), 2)
    assert all(len({len(r["images"]) for r in t}) == 1 for t in ticks)
    image_lengths = [len(r["chosen"]) for t in ticks if t[0]["images"] for r in t]
    assert sorted(set(image_lengths)) == [1, 100] and any(len({len(r["chosen"]) for r in t}) == 2
                                                          for t in ticks if t[0]["images"])


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="window_ticks"):
        length_grouped_shards(_rows([1, 2]), world=1, micro_batch_size=1, seed=0, window_ticks=-1)
    with pytest.raises(ValueError, match="group_by"):
        length_grouped_shards(_rows([1, 2]), world=1, micro_batch_size=1, seed=0, group_by="colour")
