"""mpo_online/run/shipping.py: checkpoint directories packed on the driver and written on a node without shared
storage (pure file logic; the multi-node run that uses it is the last run of tests/test_online_loop.py)."""

import pytest

from mpo_online.run.shipping import MARKER, ensure_local, is_here, pack_dir, remove_copy, weights_bytes, write_files


def ship(path, packed, fetched=None):
    """ensure_local with the pack at hand; `fetched` counts the fetches."""
    def fetch():
        if fetched is not None:
            fetched.append(1)
        return packed
    return ensure_local(path, packed["digest"], fetch)


def _checkpoint(d, weights=b"\x01\x02"):
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(weights)
    return d


def test_a_shipped_copy_has_the_same_files_and_a_marker(tmp_path):
    src = _checkpoint(tmp_path / "driver" / "v0001")
    (src / "sub").mkdir()  # checkpoints are flat: a subdirectory is not shipped
    packed = pack_dir(src)
    assert sorted(packed["files"]) == ["config.json", "model.safetensors"]
    dst = tmp_path / "node" / "v0001"
    assert is_here(src, packed["digest"]) and not is_here(dst, packed["digest"])
    assert ship(dst, packed) is True
    assert is_here(dst, packed["digest"]) and not is_here(dst, "another digest")
    assert (dst / "model.safetensors").read_bytes() == b"\x01\x02"
    assert (dst / MARKER).read_text() == packed["digest"]
    assert ship(dst, packed) is False  # already there: nothing written
    assert pack_dir(dst)["digest"] == packed["digest"]  # the marker is not part of what is shipped


def test_the_original_is_never_overwritten_and_a_stale_copy_is_replaced(tmp_path):
    original = _checkpoint(tmp_path / "v0001", b"original")
    other = pack_dir(_checkpoint(tmp_path / "elsewhere", b"other"))
    # a directory without the marker is the driver's own (this node shares its files): left alone
    assert ship(original, other) is False
    assert (original / "model.safetensors").read_bytes() == b"original"
    # a shipped copy of other content (the round was redone) is replaced
    copy = tmp_path / "copy"
    ship(copy, pack_dir(original))
    assert ship(copy, other) is True
    assert (copy / "model.safetensors").read_bytes() == b"other" and (copy / MARKER).read_text() == other["digest"]
    assert [p.name for p in tmp_path.iterdir() if p.is_dir() and ".ship-" in p.name] == []  # no temp dir left


def test_workers_of_one_node_write_one_copy_and_keep_it(tmp_path):
    """Eight threads ship the same directory to one path at once: one writes it, the others find it in place; a
    copy is never removed under a caller that found it (what a second worker replacing it used to do)."""
    import threading

    packed = pack_dir(_checkpoint(tmp_path / "src", b"w" * 1_000_000))
    dst, wrote, seen, fetched = tmp_path / "node" / "v0001", [], [], []
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        wrote.append(ship(dst, packed, fetched))
        seen.append((dst / "config.json").read_text())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wrote) == [False] * 7 + [True] and seen == ['{"model_type": "llama"}'] * 8
    assert len(fetched) == 1  # one worker fetched the bytes; the others waited and found the copy


def test_a_copy_is_removed_and_the_original_is_not(tmp_path):
    original = _checkpoint(tmp_path / "v0001")
    copy = tmp_path / "node" / "v0001"
    ship(copy, pack_dir(original))
    remove_copy(copy)
    remove_copy(original)
    assert not copy.exists() and list(copy.parent.iterdir()) == []  # the lock file too
    assert (original / "model.safetensors").exists()


def test_the_digest_tells_names_and_contents_apart(tmp_path):
    a = pack_dir(_checkpoint(tmp_path / "a", b"xy"))
    b = _checkpoint(tmp_path / "b", b"xy")
    assert pack_dir(b)["digest"] == a["digest"]
    (b / "model.safetensors").write_bytes(b"xz")
    assert pack_dir(b)["digest"] != a["digest"]
    (b / "model.safetensors").rename(b / "other.safetensors")
    (b / "other.safetensors").write_bytes(b"xy")
    assert pack_dir(b)["digest"] != a["digest"]


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        pack_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match="not the expected"):  # a pack that is not what the job announced
        ensure_local(tmp_path / "x", "0" * 64, lambda: pack_dir(_checkpoint(tmp_path / "y")))
    with pytest.raises(ValueError, match="flat file name"):
        write_files(tmp_path / "out", {"../escape": b""})
    d = _checkpoint(tmp_path / "two")
    assert weights_bytes(d) == b"\x01\x02"
    (d / "model-2.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="expected one .safetensors file"):
        weights_bytes(d)
