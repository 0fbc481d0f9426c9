"""The `mpo-online` command line as a user runs it (a subprocess each): `serve` on a run's policy and `eval` on a
prompt file with bad rows. Real vLLM / Ray Serve underneath; the tiny policy keeps them to about a minute each."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CLI = [sys.executable, "-m", "mpo_online.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(color) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, "PNG")
    return buf.getvalue()


def test_serve_names_the_run_policy_and_its_dtype_and_answers_503_until_ready(tmp_path):
    import httpx

    from mpo_online.synthetic.tiny_model import build_model_dir

    missing = subprocess.run(CLI + ["serve", "--model", str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode != 0 and "is not a model directory" in missing.stderr

    run = tmp_path / "run"
    (run / "policies").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    policy = build_model_dir(run / "policies" / "v0005", seed=0)  # what a loop run's round 5 leaves
    port = _free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(CLI + ["serve", "--model", str(policy), "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": "local"},
                            start_new_session=True)  # its own process group: the Ray cluster it starts goes with it
    base = f"http://127.0.0.1:{port}/v1"
    try:
        statuses, t0 = [], time.time()
        while not statuses or statuses[-1] != 200:  # a client polling for readiness
            assert proc.poll() is None and time.time() - t0 < 600, open(tmp_path / "serve.log").read()[-3000:]
            try:
                statuses.append(httpx.get(f"{base}/models", timeout=10).status_code)
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        # Serve's proxy answers 404 until the app's routes exist, then the ingress (up long before the engine) 503:
        # "not yet" until a replica serves, never "go ahead" early
        assert 503 in statuses and set(statuses) <= {404, 503, 200}, statuses
        card = httpx.get(f"{base}/models", timeout=10).json()["data"][0]
        assert card["metadata"]["served_from"] == {"checkpoint": str(policy.resolve()), "dtype": "float32",
                                                   "run_dir": str(run.resolve()), "policy_version": 5}
        r = httpx.post(f"{base}/chat/completions", timeout=120, json={
            "model": "policy", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["model"] == "policy@v5" and r.headers["x-policy-version"] == "5"
        while "[serve] ready" not in open(tmp_path / "serve.log").read():  # Serve marks the app running a bit later
            assert proc.poll() is None and time.time() - t0 < 600
            time.sleep(0.5)
    finally:
        # SIGTERM, as a service manager stops it (SIGINT is what Ctrl-C sends, but a background job started by a
        # non-interactive shell, like CI's, inherits SIGINT ignored)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # leave no Ray cluster behind for the tests after this one
            proc.wait(timeout=60)
            raise
    out = open(tmp_path / "serve.log").read()
    assert f"[serve] ready: policy v5 of run {run.resolve()} as policy@v5 (float32)" in out
    assert "dtype=torch.float32" in out and "Downcasting" not in out  # the engine runs what the loop evaluated
    assert "[serve] shutting down" in out and proc.returncode == 0


def test_eval_reports_quarantined_rows_and_keeps_them_beside_the_result(tmp_path):
    from mpo_online.synthetic.tiny_model import build_model_dir

    model = build_model_dir(tmp_path / "model", seed=0)
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (data / "img" / "red.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / "secret.png").write_bytes(_png((0, 0, 255)))
    rows = [{"id": f"ok{i}", "question": "How many red shapes are there?", "images": ["img/red.png"], "answer": "1"}
            for i in range(3)]
    rows += [{"id": "up", "question": "q", "images": ["../secret.png"], "answer": "1"},  # outside the data root
             {"id": "empty", "question": "", "answer": "1"}]
    (data / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "results" / "eval.json"
    p = subprocess.run(CLI + ["eval", "--model", str(model), "--data", str(data / "prompts.jsonl"), "--out", str(out),
                              "--max-tokens", "8"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rejects = tmp_path / "results" / "eval.rejects.jsonl"
    assert f"2 of 5 rows quarantined (image_outside_root: 1, missing_question: 1); they are in {rejects}" in p.stderr
    assert {json.loads(line)["id"] for line in rejects.read_text().splitlines()} == {"up", "empty"}
    result = json.loads(out.read_text())
    assert result["data"]["rows_scored"] == 3 and result["data"]["rows_quarantined"] == 2
    assert out.read_text().strip() in p.stdout  # and printed (stdout also carries vLLM's log lines)

    (data / "prompts.jsonl").write_text(json.dumps(rows[-1]) + "\n")  # nothing valid: an error, not a score of 0
    p = subprocess.run(CLI + ["eval", "--model", str(model), "--data", str(data / "prompts.jsonl")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode != 0 and "no valid rows" in p.stderr and (tmp_path / "prompts.eval_rejects.jsonl").exists()
