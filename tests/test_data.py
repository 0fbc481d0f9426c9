"""Tests for mpo_online.data.prompts: the pure validator, MMPR/TRL alias mapping, and the reader + quarantine end
to end.

The end-to-end test writes one directory with a JSONL file holding good rows and one bad row of each kind, a
parquet file in HF-datasets style and a corrupt parquet file, then checks that exactly the good rows come back as a
Ray Dataset in PROMPT_SCHEMA and every bad one is in the quarantine file with the expected reason.
"""

import base64
import io
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mpo_online.data.prompts import (
    PROMPT_SCHEMA,
    RowError,
    content_id,
    load_prompts,
    normalize_row,
    read_prompts,
    rows_from_ray,
    to_ray_dataset,
    validate_row,
)


def _img(size=(8, 8), color=(255, 0, 0), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


PNG = _img()
JPEG = _img(color=(0, 0, 255), fmt="JPEG")
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def _good(**kw):
    row = {"id": "g", "question": "How many?", "images": [PNG], "answer": "3", "kind": "qa",
           "solution": None, "meta": None}
    row.update(kw)
    return row


# ------------------------------------------------------------------------------------------ validate_row (pure)
@pytest.mark.parametrize("row, reason", [
    (_good(), None),
    (_good(images=[], answer=None, kind="open"), None),  # text-only, no ground truth
    (_good(images=[JPEG], meta='{"a": 1}', solution="s"), None),
    (_good(question=""), "missing_question"),
    (_good(question="   "), "missing_question"),
    (_good(question=None), "missing_question"),
    (_good(id=""), "invalid_id"),
    (_good(answer=["3"]), "invalid_answer"),
    (_good(answer={"a": 3}), "invalid_answer"),
    (_good(answer=""), "invalid_answer"),
    (_good(kind="mcq"), "invalid_kind"),
    (_good(answer=None, kind="qa"), "invalid_kind"),
    (_good(images=[b"not an image"]), "undecodable_image"),
    (_good(images=[PNG[: len(PNG) // 2]]), "undecodable_image"),  # header fine, data truncated
    (_good(images=["x.png"]), "invalid_images"),  # unresolved reference: normalize_row should have loaded it
    (_good(images=PNG), "invalid_images"),
    (_good(solution=["a"]), "invalid_solution"),
    (_good(meta="not json"), "invalid_meta"),
    (_good(meta="[1, 2]"), "invalid_meta"),
    ("a string", "not_an_object"),
])
def test_validate_row(row, reason):
    assert validate_row(row) == reason


def test_validate_row_oversize_uses_max_pixels():
    row = _good(images=[_img(size=(100, 100))])
    assert validate_row(row) is None
    assert validate_row(row, max_pixels=64 * 64) == "oversize_image"


# ------------------------------------------------------------------------------------------------ normalize_row
def test_normalize_mmpr_row(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(PNG)
    raw = {"image": "imgs/a.png", "question": "<image>\nWhat is shown?", "chosen": "x", "rejected": "y"}
    row = normalize_row(raw, tmp_path)
    assert row["images"] == [PNG]  # relative to base_dir, not the cwd
    assert row["question"] == "What is shown?"  # the placeholder is dropped: images travel as parts
    assert row["answer"] is None and row["kind"] == "open"
    assert row["id"].startswith("sha-") and row["id"] == normalize_row(dict(raw), tmp_path)["id"]
    assert set(row) == set(PROMPT_SCHEMA.names)
    assert validate_row(row) is None


def test_normalize_trl_rows():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count the dots."}]}]
    row = normalize_row({"prompt": messages, "images": [{"bytes": PNG, "path": None}], "ground_truth": 4, "idx": 17})
    assert row == {"id": "17", "question": "Count the dots.", "images": [PNG], "answer": "4", "kind": "qa",
                   "solution": None, "meta": None}
    # R1-style: the answer lives in the reference solution.
    row = normalize_row({"problem": "2+5?", "image": DATA_URL, "solution": "So it is \\boxed{7}.",
                         "metadata": {"src": "x"}})
    assert (row["answer"], row["kind"], row["images"], row["meta"]) == ("7", "qa", [PNG], '{"src": "x"}')
    # A decoded HF Image (PIL) is re-encoded; float answers that are integers lose the ".0".
    row = normalize_row({"question": "q", "image": Image.open(io.BytesIO(JPEG)), "answer": 2.0})
    assert Image.open(io.BytesIO(row["images"][0])).size == (8, 8) and row["answer"] == "2"
    assert normalize_row({"question": "q", "answer": 2.5})["answer"] == "2.5"


def test_normalize_errors(tmp_path):
    with pytest.raises(RowError) as e:
        normalize_row({"question": "q", "image": "missing.png"}, tmp_path)
    assert e.value.reason == "image_not_found"
    with pytest.raises(RowError) as e:
        normalize_row({"question": "q", "image": "https://example.com/a.png"})
    assert e.value.reason == "image_not_found"
    with pytest.raises(RowError) as e:
        normalize_row({"question": "q", "image": "data:image/png;base64,%%%"})
    assert e.value.reason == "undecodable_image"
    with pytest.raises(RowError) as e:
        normalize_row({"question": "q", "images": [42]})
    assert e.value.reason == "invalid_images"


def test_content_id_is_stable_and_content_sensitive():
    a = normalize_row({"question": "q", "images": [PNG], "answer": "1"})
    assert a["id"] == content_id(a)
    assert normalize_row({"question": "q", "images": [JPEG], "answer": "1"})["id"] != a["id"]
    assert normalize_row({"question": "q", "images": [PNG], "answer": "2"})["id"] != a["id"]


# ------------------------------------------------------------------------------------------- reader end to end
GOOD_JSONL = [
    {"id": "p1", "question": "How many?", "images": ["img/ok.png"], "answer": "3"},  # path relative to the file
    {"id": "p2", "question": "What color?", "images": [DATA_URL], "answer": 5},  # data URL; int answer -> "5"
    {"id": "p3", "question": "Describe.", "image": {"path": "img/ok.jpg"}},  # HF dict with a path; open
    {"question": "No id here.", "answer": "1"},  # text-only; gets a content-hash id
]
BAD_JSONL = [  # (row, expected reason); rows are written as JSON lines
    ({"id": "b1", "question": "", "images": [DATA_URL]}, "missing_question"),
    ({"id": "b2", "images": [DATA_URL], "answer": "1"}, "missing_question"),
    ({"id": "b3", "question": "q", "images": ["img/garbage.png"]}, "undecodable_image"),
    ({"id": "b4", "question": "q", "images": ["img/nope.png"]}, "image_not_found"),
    ({"id": "b5", "question": "q", "answer": ["1", "2"]}, "invalid_answer"),
    ({"id": "b6", "question": "q", "answer": {"v": 1}}, "invalid_answer"),
    ({"id": "b7", "question": "q", "images": ["img/big.png"]}, "oversize_image"),
    ({"id": "p1", "question": "Same id as a good row."}, "duplicate_id"),
    ({"id": "b9", "question": "q", "kind": "qa"}, "invalid_kind"),
    ({"id": "b10", "question": "q", "images": ["data:image/png;base64,@@"]}, "undecodable_image"),
    ({"id": "b11", "question": "q", "meta": "{broken"}, "invalid_meta"),
    # a real PNG beside the data directory: the data file may not reach it, relatively or absolutely
    ({"id": "b12", "question": "q", "images": ["../outside.png"]}, "image_outside_root"),
    ({"id": "b13", "question": "q", "images": ["OUTSIDE_ABS"]}, "image_outside_root"),
]


@pytest.fixture()
def data_dir(tmp_path):
    d = tmp_path / "prompts"
    (d / "img").mkdir(parents=True)
    (d / "img" / "ok.png").write_bytes(PNG)
    (d / "img" / "ok.jpg").write_bytes(JPEG)
    (d / "img" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (d / "img" / "big.png").write_bytes(_img(size=(80, 80)))
    (tmp_path / "outside.png").write_bytes(PNG)
    outside = str(tmp_path / "outside.png")
    lines = [json.dumps(r) for r in GOOD_JSONL[:2]]
    lines += [json.dumps(r).replace("OUTSIDE_ABS", outside) for r, _ in BAD_JSONL]
    lines += ["{not json", "[1, 2]", ""] + [json.dumps(r) for r in GOOD_JSONL[2:]]
    (d / "a.jsonl").write_text("\n".join(lines) + "\n")
    # HF datasets style parquet: a struct image column, `prompt`/`ground_truth` names, one bad row.
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"prompt": ["<image>Parquet question?", "Parquet bad?"],
                      "image": pa.array([{"bytes": JPEG, "path": None}, {"bytes": b"junk", "path": None}], image_type),
                      "ground_truth": ["2", "1"], "uid": ["q1", "q2"]})
    pq.write_table(table, d / "b.parquet")
    (d / "c.parquet").write_bytes(b"this is not parquet")
    (d / "_ignored.jsonl").write_text("{}\n")  # _-prefixed files are not data
    return d


EXPECTED_IDS = ["p1", "p2", "p3", content_id(normalize_row(dict(GOOD_JSONL[3]))), "q1"]
EXPECTED_REASONS = Counter([reason for _, reason in BAD_JSONL] + ["invalid_json", "not_an_object",
                                                                  "undecodable_image", "unreadable_file"])


def test_read_prompts_returns_good_rows_and_quarantines_the_rest(ray_local, data_dir, tmp_path):
    qpath = tmp_path / "out" / "quarantine.jsonl"
    ds, report = read_prompts(data_dir, quarantine_path=qpath, max_pixels=64 * 64)

    assert ds.schema().base_schema == PROMPT_SCHEMA
    rows = rows_from_ray(ds)
    assert [r["id"] for r in rows] == EXPECTED_IDS
    by_id = {r["id"]: r for r in rows}
    assert by_id["p1"]["images"] == [PNG] and by_id["p2"]["images"] == [PNG]
    assert by_id["p2"]["answer"] == "5" and by_id["p2"]["kind"] == "qa"
    assert by_id["p3"]["images"] == [JPEG] and by_id["p3"]["kind"] == "open" and by_id["p3"]["answer"] is None
    assert by_id["q1"] == {"id": "q1", "question": "Parquet question?", "images": [JPEG], "answer": "2",
                           "kind": "qa", "solution": None, "meta": None}
    assert by_id[EXPECTED_IDS[3]]["images"] == []

    assert report.path == str(qpath)
    assert report.counts == dict(EXPECTED_REASONS)
    assert report.n_valid == len(EXPECTED_IDS) and report.n_quarantined == sum(EXPECTED_REASONS.values())
    assert report.n_seen == report.n_valid + report.n_quarantined  # nothing silently dropped
    assert report.by_kind == {"qa": 4, "open": 1}
    assert all("_ignored" not in s for s in report.sources) and len(report.sources) == 3

    lines = [json.loads(line) for line in qpath.read_text().splitlines()]
    assert Counter(x["reason"] for x in lines) == EXPECTED_REASONS
    reason_of = {x["id"]: x["reason"] for x in lines if x["id"] not in (None, "p1")}
    for row, reason in BAD_JSONL:
        if row["id"] != "p1":
            assert reason_of[row["id"]] == reason
    assert reason_of["q2"] == "undecodable_image"
    assert next(x for x in lines if x["reason"] == "invalid_json")["row"] == "{not json"  # the line itself
    dup = next(x for x in lines if x["reason"] == "duplicate_id")
    assert dup["id"] == "p1" and dup["row"]["question"] == "Same id as a good row."
    for x in lines:
        assert set(x) == {"id", "source", "index", "reason", "detail", "row"} and x["detail"]
        assert x["source"].startswith(str(data_dir))
    q2 = next(x for x in lines if x["id"] == "q2")
    assert q2["row"]["image"]["bytes"] == {"<bytes>": 4, "sha256": q2["row"]["image"]["bytes"]["sha256"]}


def test_load_prompts_needs_no_ray_and_matches(data_dir, tmp_path):
    rows, report = load_prompts(data_dir / "a.jsonl", quarantine_path=tmp_path / "q.jsonl", max_pixels=64 * 64)
    assert [r["id"] for r in rows] == EXPECTED_IDS[:4]
    assert report.n_seen == 4 + len(BAD_JSONL) + 2
    assert (tmp_path / "q.jsonl").read_text().count("\n") == report.n_quarantined


def test_image_paths_stay_inside_the_data_root_unless_allowed(data_dir, tmp_path):
    (data_dir / "sub").mkdir()
    (data_dir / "sub" / "x.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"id": "in", "question": "q", "images": ["../img/ok.png"]},  # leaves its file's folder, not the data root
        {"id": "up", "question": "q", "images": ["../../outside.png"]},
        {"id": "link", "question": "q", "images": ["ln.png"]})) + "\n")
    (data_dir / "sub" / "ln.png").symlink_to(tmp_path / "outside.png")  # a symlink out counts as outside
    rows, report = load_prompts(data_dir / "sub", quarantine_path=tmp_path / "q.jsonl")  # root: sub/
    assert rows == [] and report.counts == {"image_outside_root": 3}
    assert "outside the data root" in (tmp_path / "q.jsonl").read_text()
    rows, report = load_prompts(data_dir, quarantine_path=tmp_path / "q.jsonl")
    assert "in" in [r["id"] for r in rows]
    assert report.counts["image_outside_root"] == 4  # b12, b13, up, link
    rows, report = load_prompts(data_dir, quarantine_path=tmp_path / "q.jsonl", images_anywhere=True)
    assert {"b12", "b13", "up", "link"} <= {r["id"] for r in rows} and "image_outside_root" not in report.counts


def test_clean_data_writes_an_empty_quarantine_and_roundtrips(ray_local, tmp_path):
    rows = [normalize_row({"id": f"r{i}", "question": f"q{i}", "images": [PNG], "answer": str(i)}) for i in range(5)]
    ds = to_ray_dataset(rows, block_rows=2)
    assert ds.schema().base_schema == PROMPT_SCHEMA and ds.count() == 5
    assert rows_from_ray(ds) == rows
    pq.write_table(pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA), tmp_path / "clean.parquet")
    ds2, report = read_prompts(tmp_path / "clean.parquet", quarantine_path=tmp_path / "q.jsonl")
    assert report.counts == {} and (tmp_path / "q.jsonl").read_text() == ""
    assert rows_from_ray(ds2) == rows
    empty = to_ray_dataset([])
    assert empty.count() == 0 and empty.schema().base_schema == PROMPT_SCHEMA
