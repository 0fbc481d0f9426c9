"""The prompt schema and its readers: any parquet/JSONL prompt set -> a Ray Dataset of valid rows + a quarantine file.

Every prompt mpo-online samples from, built-in synthetic tasks (mpo_online/synthetic/tasks.py) or a user's own data,
is a row of `PROMPT_SCHEMA`:

    id        string             unique key; pairs, rollouts and metrics refer to prompts by it
    question  string             the user turn's text; "<image>" marks where each image goes (one per image; without
                                 placeholders the images come first, see records.content_parts)
    images    list<binary>       encoded image bytes (PNG/JPEG/anything PIL decodes); [] for a text-only prompt
    answer    string, nullable   ground-truth final answer; null = no ground truth
    kind      string             "qa" (has an answer: reward = answer match) or "open" (no answer: Dropout-NTP pairs)
    solution  string, nullable   a reference chain of thought ending in "Final answer: ..." (warm-start SFT)
    meta      string, nullable   JSON object with anything else (level, counts, source, ...)

All arrow fields are nullable; presence of id/question/kind is enforced by `validate_row`, not by the arrow schema,
so schemas coming out of Ray transforms still compare equal.

Used by the jobs (`read_prompts(path, quarantine_path=run_dir/"quarantine.jsonl")`) and tests; no command of its own.
Reading happens on the driver (`load_prompts`, no Ray needed): each row is normalised (`normalize_row`: column
aliases, image paths/data-URLs -> bytes, numbers -> strings) and validated (`validate_row`: pure, decodes every
image). Rows that fail land in a JSONL quarantine file with their reason: never a crash, never silently dropped.
Fine up to ~1e5 rows; larger sets would move the same two functions into a `map_batches`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

PROMPT_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("question", pa.string()),
    pa.field("images", pa.list_(pa.binary())),
    pa.field("answer", pa.string()),
    pa.field("kind", pa.string()),
    pa.field("solution", pa.string()),
    pa.field("meta", pa.string()),
])
KINDS = ("qa", "open")
DEFAULT_MAX_PIXELS = 4096 * 4096  # per image; far above any VLM input size, low enough to stop decompression bombs

# Column aliases, first present (non-null) wins. Covers our own schema, MMPR rows (image/question/chosen/rejected)
# and TRL-style vision rows (prompt/images, prompt possibly a list of chat messages). Unlisted columns are dropped
# (chosen/rejected among them: mpo-online samples its own responses); put anything worth keeping into `meta`.
ALIASES: dict[str, tuple[str, ...]] = {
    "id": ("id", "uid", "idx", "sample_id", "question_id"),
    "question": ("question", "prompt", "query", "problem"),
    "images": ("images", "image", "image_path", "image_paths", "image_url"),
    "answer": ("answer", "ground_truth", "gt_answer", "final_answer"),
    "kind": ("kind",),
    "solution": ("solution",),
    "meta": ("meta", "metadata"),
}

# Quarantine reasons (the `reason` field of a quarantine line, the keys of QuarantineReport.counts).
R_UNREADABLE_FILE = "unreadable_file"  # the whole file failed to parse; one line for the file
R_INVALID_JSON = "invalid_json"  # a JSONL line that is not JSON
R_NOT_AN_OBJECT = "not_an_object"  # a JSONL line that is JSON but not an object
R_INVALID_ID = "invalid_id"
R_DUPLICATE_ID = "duplicate_id"  # the second and later rows with an id already seen (first one wins)
R_MISSING_QUESTION = "missing_question"  # absent, empty/whitespace or not a string
R_INVALID_ANSWER = "invalid_answer"  # list/dict/bool/NaN/empty string (use null for "no ground truth")
R_INVALID_KIND = "invalid_kind"  # not "qa"/"open", or "qa" without an answer
R_INVALID_IMAGES = "invalid_images"  # images of an unsupported type (e.g. a number)
R_IMAGE_NOT_FOUND = "image_not_found"  # a path that does not exist (remote URLs are not fetched either)
R_IMAGE_OUTSIDE_ROOT = "image_outside_root"  # a path leaving the data root (`../../etc/x`, an absolute path elsewhere)
R_UNDECODABLE_IMAGE = "undecodable_image"  # bytes PIL cannot verify+load, or a broken data URL
R_OVERSIZE_IMAGE = "oversize_image"  # width*height > max_pixels
R_INVALID_SOLUTION = "invalid_solution"
R_INVALID_META = "invalid_meta"  # not a JSON object (dicts are serialised for you)

_IMAGE_PLACEHOLDER = re.compile(r"<image>\s*")
# Ways a reference solution states its final answer (ours, LaTeX \boxed{}, R1-style <answer> tags).
_SOLUTION_ANSWER = [re.compile(r"Final answer:\s*(.+?)\s*$", re.M), re.compile(r"\\boxed\{([^{}]+)\}"),
                    re.compile(r"<answer>\s*(.+?)\s*</answer>", re.S)]


class RowError(ValueError):
    """A row that cannot even be normalised (e.g. its image file is missing). Carries a quarantine reason."""

    def __init__(self, reason: str, detail: str = "", raw: Any = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.raw = reason, detail, raw  # raw: e.g. the unparseable JSONL line


@dataclass
class QuarantineReport:
    """What `read_prompts` did: rows seen, kept (by kind), quarantined (by reason), and where the quarantine file is."""

    path: str
    sources: list[str] = field(default_factory=list)
    n_seen: int = 0
    n_valid: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def n_quarantined(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"path": self.path, "sources": self.sources, "n_seen": self.n_seen, "n_valid": self.n_valid,
                "n_quarantined": self.n_quarantined, "by_kind": self.by_kind, "counts": self.counts}


# ----------------------------------------------------------------------------------------------- normalisation
def _first(row: dict, names: tuple[str, ...]) -> Any:
    for name in names:
        if row.get(name) is not None:
            return row[name]
    return None


def _question_text(q: Any, n_images: int) -> Any:
    """A question string, or the text of the last user turn of a chat-message list (TRL conversational format).

    "<image>" placeholders are kept where they place images inside or after the text (one per image); leading ones
    (MMPR's "<image>\nQuestion") and mismatching counts are removed: the images then go first, the default layout."""
    if isinstance(q, list) and q and all(isinstance(m, dict) and "role" in m for m in q):
        users = [m for m in q if m.get("role") == "user"] or q
        content = users[-1].get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        q = content
    if isinstance(q, str):
        text_first = bool(q.split("<image>")[0].strip())
        after_text = any(piece.strip() for piece in q.split("<image>")[:-1])  # some image comes after some text
        if q.count("<image>") == n_images and n_images and (text_first or after_text):
            return q.strip()
        return _IMAGE_PLACEHOLDER.sub("", q).strip()
    return q


def _load_image_ref(ref: str, base_dir: Path | None, root: Path | None = None) -> bytes:
    if ref.startswith("data:"):
        header, _, payload = ref.partition(",")
        if ";base64" not in header:
            raise RowError(R_UNDECODABLE_IMAGE, "data URL is not base64")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RowError(R_UNDECODABLE_IMAGE, f"bad base64 in data URL: {e}") from None
    if ref.startswith(("http://", "https://")):
        raise RowError(R_IMAGE_NOT_FOUND, f"remote URLs are not fetched: {ref[:200]}")
    p = Path(ref.removeprefix("file://"))
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p  # relative paths are relative to the data file, not the working directory
    # a data file must not make the reader open files elsewhere (`../../../etc/hostname`, `/root/.ssh/...`): paths
    # resolve (symlinks too) inside the data root unless the caller allowed any path (root None)
    if root is not None and not p.resolve().is_relative_to(root):
        raise RowError(R_IMAGE_OUTSIDE_ROOT, f"{ref[:200]} resolves outside the data root {root}")
    if not p.is_file():
        raise RowError(R_IMAGE_NOT_FOUND, str(p))
    return p.read_bytes()


def _image_bytes(item: Any, base_dir: Path | None, root: Path | None = None) -> bytes:
    """One image in any accepted form -> its encoded bytes (not decoded here; validate_row does that)."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, str):
        return _load_image_ref(item, base_dir, root)
    if isinstance(item, dict):  # HF datasets Image feature {"bytes", "path"}, or {"url": ...}
        if item.get("bytes") is not None:
            return _image_bytes(item["bytes"], base_dir, root)
        ref = item.get("path") or item.get("url")
        if isinstance(ref, str):
            return _load_image_ref(ref, base_dir, root)
        raise RowError(R_INVALID_IMAGES, f"image dict without bytes/path/url: keys {sorted(item)}")
    if hasattr(item, "save") and hasattr(item, "size"):  # a PIL image (HF datasets with decode=True)
        buf = io.BytesIO()
        item.save(buf, format="PNG")
        return buf.getvalue()
    raise RowError(R_INVALID_IMAGES, f"unsupported image type {type(item).__name__}")


def _answer_value(a: Any) -> Any:
    """Numbers become strings (3 -> "3", 3.0 -> "3", 2.5 -> "2.5"): a numeric ground truth is common and unambiguous.
    Strings are stripped. Anything else (bool, list, dict, NaN) is returned as is for validate_row to reject."""
    if isinstance(a, bool):
        return a
    if isinstance(a, int):
        return str(a)
    if isinstance(a, float) and math.isfinite(a):
        return str(int(a)) if a.is_integer() else repr(a)
    if isinstance(a, str):
        return a.strip()
    return a


def content_id(row: dict) -> str:
    """A stable id for a row without one: hash of question, answer and image bytes. Identical rows get the same id,
    so exact duplicates are caught as duplicate_id instead of being trained on twice."""
    h = hashlib.sha256()
    h.update(str(row.get("question")).encode())
    h.update(b"\x00" + str(row.get("answer")).encode())
    for img in row.get("images") or []:
        h.update(b"\x00" + hashlib.sha256(img if isinstance(img, bytes) else str(img).encode()).digest())
    return "sha-" + h.hexdigest()[:16]


def normalize_row(row: dict, base_dir: str | Path | None = None, image_root: str | Path | None = None) -> dict:
    """Map one raw row (our schema, MMPR or TRL style) onto PROMPT_SCHEMA's fields.

    Resolves aliases (ALIASES), chat-message prompts, image paths (relative to `base_dir`), data URLs, HF Image dicts
    and PIL images into bytes (with `image_root`, a path that resolves outside it is refused); numbers into strings;
    a dict meta into JSON; a missing id into `content_id` (rather than rejecting: ids only need to be unique and
    stable); a missing kind into "qa"/"open" from the answer; a missing answer is taken from the solution's
    "Final answer:"/\\boxed{}/<answer> when present. Raises RowError only for what cannot be represented (missing
    file, broken data URL, unsupported image type); everything else is left for `validate_row` to judge.
    """
    if not isinstance(row, dict):
        raise RowError(R_NOT_AN_OBJECT, type(row).__name__)
    base = Path(base_dir) if base_dir is not None else None
    root = Path(image_root).resolve() if image_root is not None else None
    images = _first(row, ALIASES["images"])
    if images is None:
        images = []
    elif not isinstance(images, (list, tuple)):
        images = [images]  # a single image column (MMPR "image")
    images = [_image_bytes(it, base, root) for it in images]

    solution = _first(row, ALIASES["solution"])
    answer = _answer_value(_first(row, ALIASES["answer"]))
    if answer is None and isinstance(solution, str):
        for pattern in _SOLUTION_ANSWER:
            m = pattern.search(solution)
            if m:
                answer = m.group(1).strip()
                break
    kind = _first(row, ALIASES["kind"])
    if kind is None:
        kind = "qa" if answer is not None else "open"
    meta = _first(row, ALIASES["meta"])
    if isinstance(meta, dict):
        try:
            meta = json.dumps(meta, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise RowError(R_INVALID_META, f"meta is not JSON-serialisable: {e}") from None

    out = {"id": None, "question": _question_text(_first(row, ALIASES["question"]), len(images)), "images": images,
           "answer": answer, "kind": kind, "solution": solution, "meta": meta}
    rid = _first(row, ALIASES["id"])
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    out["id"] = rid if rid is not None else content_id(out)
    return out


# --------------------------------------------------------------------------------------------------- validation
def _check_image(data: Any, max_pixels: int) -> tuple[str, str] | None:
    from PIL import Image

    if not isinstance(data, bytes):
        return R_INVALID_IMAGES, f"image is {type(data).__name__}, not bytes"
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:  # checked from the header, before any pixel is decoded
                return R_OVERSIZE_IMAGE, f"{w}x{h} > {max_pixels} pixels"
            im.verify()  # structure/checksums; the image is unusable afterwards, so reopen to decode
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Image.DecompressionBombError as e:
        return R_OVERSIZE_IMAGE, str(e)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error...)
        msg = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))  # keep quarantine files reproducible
        return R_UNDECODABLE_IMAGE, f"{type(e).__name__}: {msg}"
    return None


def check_row(row: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, str] | None:
    """`validate_row` with a human-readable detail: (reason, detail) or None if the row is valid."""
    if not isinstance(row, dict):
        return R_NOT_AN_OBJECT, type(row).__name__
    rid = row.get("id")
    if not isinstance(rid, str) or not rid.strip():
        return R_INVALID_ID, f"id {rid!r}"
    q = row.get("question")
    if not isinstance(q, str) or not q.strip():
        return R_MISSING_QUESTION, f"question {q!r:.80}"
    a = row.get("answer")
    if a is not None and (not isinstance(a, str) or not a.strip()):
        return R_INVALID_ANSWER, f"answer must be a non-empty string or null, got {type(a).__name__} {a!r:.80}"
    kind = row.get("kind")
    if kind not in KINDS:
        return R_INVALID_KIND, f"kind {kind!r} not in {KINDS}"
    if kind == "qa" and a is None:
        return R_INVALID_KIND, "kind 'qa' needs an answer"
    images = row.get("images")
    if not isinstance(images, list):
        return R_INVALID_IMAGES, f"images is {type(images).__name__}, not a list"
    for i, img in enumerate(images):
        bad = _check_image(img, max_pixels)
        if bad:
            return bad[0], f"image {i}: {bad[1]}"
    sol = row.get("solution")
    if sol is not None and not isinstance(sol, str):
        return R_INVALID_SOLUTION, f"solution is {type(sol).__name__}"
    meta = row.get("meta")
    if meta is not None:
        try:
            ok = isinstance(meta, str) and isinstance(json.loads(meta), dict)
        except ValueError:
            ok = False
        if not ok:
            return R_INVALID_META, f"meta must be a JSON object string, got {meta!r:.80}"
    return None


def validate_row(row: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """The quarantine reason for a normalised row, or None if it is valid. Pure: no I/O, no Ray."""
    bad = check_row(row, max_pixels=max_pixels)
    return bad[0] if bad else None


# ------------------------------------------------------------------------------------------------------ reading
def _summarise(value: Any, depth: int = 0) -> Any:
    """A JSON-safe preview of a row for the quarantine file: bytes -> length + hash, long strings cut."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        b = bytes(value)
        return {"<bytes>": len(b), "sha256": hashlib.sha256(b).hexdigest()[:16]}
    if isinstance(value, str):
        return value if len(value) <= 500 else value[:500] + f"...<{len(value)} chars>"
    if isinstance(value, dict) and depth < 4:
        return {str(k): _summarise(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and depth < 4:
        more = [f"...<{len(value)} items>"] if len(value) > 20 else []
        return [_summarise(v, depth + 1) for v in value[:20]] + more
    if value is None or isinstance(value, (bool, int)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return repr(value)[:200]


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no prompt data at {path}")
    # Hidden and _-prefixed files (e.g. _SUCCESS, a quarantine file someone put there) are not data.
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".parquet", ".jsonl", ".json")
                  and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts))


def _raw_rows(file: Path):
    """Yield (index, row-or-RowError) for every record of one file; a file that cannot be parsed yields one error."""
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(file).to_pylist()
        except Exception as e:
            yield None, RowError(R_UNREADABLE_FILE, f"{type(e).__name__}: {e}")
            return
        yield from enumerate(rows)
        return
    try:
        text = file.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        yield None, RowError(R_UNREADABLE_FILE, f"{type(e).__name__}: {e}")
        return
    if file.suffix == ".json" and text.lstrip().startswith("["):  # a JSON array file
        try:
            yield from enumerate(json.loads(text))
        except ValueError as e:
            yield None, RowError(R_UNREADABLE_FILE, f"invalid JSON array: {e}")
        return
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except ValueError as e:
            yield i, RowError(R_INVALID_JSON, str(e), raw=line)


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Normalised rows -> an arrow table in exactly PROMPT_SCHEMA (column order included)."""
    return pa.Table.from_pylist([{k: r.get(k) for k in PROMPT_SCHEMA.names} for r in rows], schema=PROMPT_SCHEMA)


def write_prompts_parquet(rows: list[dict], path: str | Path) -> Path:
    """Write rows as parquet in PROMPT_SCHEMA. Deterministic: same rows -> same bytes (no timestamps in parquet)."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(rows_to_table(rows), path, compression="zstd")
    return path


def to_ray_dataset(rows: list[dict], *, block_rows: int = 256):
    """Normalised rows -> a Ray Dataset in PROMPT_SCHEMA, split into blocks so downstream stages can run in parallel."""
    import ray

    table = rows_to_table(rows)
    blocks = [table.slice(i, block_rows) for i in range(0, table.num_rows, block_rows)] or [table]
    return ray.data.from_arrow(blocks)


def rows_from_ray(ds) -> list[dict]:
    """A Ray Dataset -> list of plain dicts (bytes stay bytes, lists stay lists; take_all may give numpy arrays)."""
    import ray

    tables = ray.get(ds.to_arrow_refs())
    return pa.concat_tables(tables).to_pylist() if tables else []


def load_prompts(path_or_dir: str | Path, *, quarantine_path: str | Path | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, images_anywhere: bool = False,
                 ) -> tuple[list[dict], QuarantineReport]:
    """Read parquet/JSONL prompts (a file, or a directory of them, recursively) -> (valid rows, QuarantineReport).

    No Ray: this is the driver-side half of `read_prompts`. Valid rows are normalised, in file order. Every other
    record is appended to `quarantine_path` as one JSON line {"id", "source", "index" (0-based row / line number),
    "reason", "detail", "row"}, "row" being the record as read (before normalisation) with bytes summarised.
    The quarantine file is always written (empty when nothing was bad) so a job can link it; without a path it goes
    to the temp directory. Image paths in the data must resolve inside the data root (the directory given, or the
    file's own directory) unless `images_anywhere`; rows that point elsewhere are quarantined (image_outside_root).
    """
    src = Path(path_or_dir)
    root = None if images_anywhere else (src if src.is_dir() else src.parent)
    if quarantine_path is None:
        tag = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:8]
        quarantine_path = Path(tempfile.gettempdir()) / "mpo-online-quarantine" / f"{src.stem}-{tag}.jsonl"
    qpath = Path(quarantine_path)
    qpath.parent.mkdir(parents=True, exist_ok=True)
    files = _data_files(src)
    report = QuarantineReport(path=str(qpath), sources=[str(f) for f in files])
    counts, kinds, seen, valid = Counter(), Counter(), set(), []
    with open(qpath, "w", encoding="utf-8") as qf:
        for file in files:
            for index, raw in _raw_rows(file):
                report.n_seen += 1
                row, bad = None, None
                if isinstance(raw, RowError):
                    bad, raw = (raw.reason, raw.detail), raw.raw
                else:
                    try:
                        row = normalize_row(raw, file.parent, image_root=root)
                        bad = check_row(row, max_pixels=max_pixels)
                    except RowError as e:
                        bad = (e.reason, e.detail)
                    if bad is None and row["id"] in seen:
                        bad = (R_DUPLICATE_ID, f"id {row['id']!r} already used by an earlier row")
                if bad is None:
                    seen.add(row["id"])
                    kinds[row["kind"]] += 1
                    valid.append(row)
                    continue
                counts[bad[0]] += 1
                rid = row["id"] if row else (_first(raw, ALIASES["id"]) if isinstance(raw, dict) else None)
                record = {"id": rid if isinstance(rid, (str, int)) else None, "source": str(file), "index": index,
                          "reason": bad[0], "detail": bad[1], "row": _summarise(raw)}
                qf.write(json.dumps(record, sort_keys=True) + "\n")
    report.n_valid, report.by_kind, report.counts = len(valid), dict(kinds), dict(counts)
    return valid, report


def read_prompts(path_or_dir: str | Path, *, quarantine_path: str | Path | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, block_rows: int = 256, images_anywhere: bool = False):
    """`load_prompts`, returned as (ray.data.Dataset in PROMPT_SCHEMA, QuarantineReport). Needs Ray initialised
    (or initialises a local one, as any Ray Data call does)."""
    rows, report = load_prompts(path_or_dir, quarantine_path=quarantine_path, max_pixels=max_pixels,
                                images_anywhere=images_anywhere)
    return to_ray_dataset(rows, block_rows=block_rows), report
