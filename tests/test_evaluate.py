"""Unit test of the held-out scorer's bookkeeping (mpo_online/evaluate.py) with a fake generator: pure logic."""

from __future__ import annotations

from mpo_online.evaluate import evaluate


def test_each_answer_is_scored_against_its_own_request_whatever_the_order_sent():
    """Two questions (golds 3 and 7) and one open prompt. The fake engine answers a CoT request right only for the
    first question, a direct request right only for the second, describes the image as "grid" with it and "nothing"
    without it. So CoT accuracy 1/2, direct 1/2, and image dependence = 1 - ratio("grid", "nothing") > 0; the
    descriptions go out first (longest first), which must not mix the answers up."""
    rows = [{"id": "a", "question": "How many?", "answer": "3", "images": [b"png"], "meta": None},
            {"id": "b", "question": "How many more?", "answer": "7", "images": [b"png"], "meta": None},
            {"id": "c", "question": "Describe the image.", "answer": None, "images": [b"png"], "meta": None}]
    sent = []

    def generate(requests):
        out = []
        for q in requests:
            parts = q["messages"][0]["content"]
            text = "".join(p.get("text", "") for p in parts if p["type"] == "text")
            has_image = any(p["type"] == "image_url" for p in parts)
            sent.append(text)
            if text.startswith("Describe"):
                out.append("grid" if has_image else "nothing")
            elif text.endswith(" Think."):
                out.append("Final answer: 3" if text.startswith("How many?") else "Final answer: 1")
            else:
                out.append("Final answer: 7" if text.startswith("How many more?") else "no answer")
        return out

    ev = evaluate(generate, rows, cot_instruction=" Think.", direct_instruction=" Directly.")
    assert sent[:2] == ["Describe the image.", "Describe the image."]   # longest answers first
    assert ev["accuracy_cot"] == 0.5 and ev["accuracy_direct"] == 0.5
    assert ev["format_failure_rate"] == 0.0 and ev["format_failure_rate_direct"] == 0.5
    assert ev["n_qa"] == 2 and ev["n_open"] == 1 and ev["image_dependence"] > 0.5
    assert [e["text"] for e in ev["examples"]] == ["Final answer: 3", "Final answer: 1"]
