"""The run directory: resolved config, per-round manifests, policies, and what resume needs.

    runs/<name>/
      config.yaml, run.json            resolved config; its hash (a different config is refused unless --force)
      policies/v0000/ ...              Hugging Face checkpoints; v0 = warm start, vN = after round N
      rounds/round_0001/manifest.json  phase reached, policy version, seeds, delta, file checksums, stats, seconds
      rounds/round_0001/pairs.parquet  the round's preference pairs (+ rollouts.parquet, rejects.jsonl, train/)
      summary.json, metrics.jsonl, report.md, accuracy.png, tb/

Every write is atomic (temp file + rename), and a manifest is rewritten after each phase, so a run killed at any
moment (kill -9) restarts at the phase it was in: the phases before it are not redone, the one it was in is redone
from its inputs (rollouts are seeded; training resumes from its last Ray Train checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from mpo_online.config import RunConfig, dump_config
from mpo_online.data.records import RoundManifest, write_text_atomic

PHASES = ("started", "pairs", "trained", "swapped", "evaluated", "done")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (e.g. it belongs to a different config)."""


def write_json_atomic(path: str | Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True, default=str))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def phase_at_least(manifest: RoundManifest | None, phase: str) -> bool:
    return manifest is not None and PHASES.index(manifest.phase) >= PHASES.index(phase)


class RunDir:
    """A run directory. `open` creates it or checks it belongs to the same config."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def open(cls, root: str | Path, cfg: RunConfig, *, force: bool = False) -> RunDir:
        run = cls(root)
        run.root.mkdir(parents=True, exist_ok=True)
        info_path = run.root / "run.json"
        if info_path.exists():
            info = json.loads(info_path.read_text())
            if info.get("config_hash") != cfg.hash() and not force:
                raise RunDirError(
                    f"run directory {run.root} was made by a different config (hash {info.get('config_hash')}, "
                    f"this one is {cfg.hash()}); see {run.root / 'config.yaml'}. Use another loop.run_dir, or pass "
                    "--force to continue it with the new config.")
        dump_config(cfg, run.root / "config.yaml")
        write_json_atomic(info_path, {"config_hash": cfg.hash()})
        for sub in ("policies", "rounds"):
            (run.root / sub).mkdir(exist_ok=True)
        return run

    def record_session(self, argv: list[str], note: str | None = None) -> dict:
        """Append this session's command line, code commit, date and machine to <run>/sessions.jsonl: what a results
        table (mpo_online/run/results.py) cites for the run's figures."""
        import datetime
        import subprocess

        from mpo_online.run.machine import describe_machine
        repo = Path(__file__).resolve().parents[2]

        def git(*args):
            try:
                return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                                      timeout=10).stdout.strip() or None
            except (OSError, subprocess.SubprocessError):
                return None
        entry = {"started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                 "argv": list(argv), "commit": git("rev-parse", "--short=7", "HEAD"),
                 "dirty": bool(git("status", "--porcelain", "--untracked-files=no")), "machine": describe_machine(),
                 **({"note": note} if note else {})}
        with open(self.root / "sessions.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        return entry

    # --- policies -------------------------------------------------------------------------------------------------
    def policy_dir(self, version: int) -> Path:
        return self.root / "policies" / f"v{version:04d}"

    @staticmethod
    def policy_origin(path: str | Path) -> dict:
        """The inverse of `policy_dir`: `<run>/policies/vNNNN` of a run directory -> {"run_dir", "policy_version"};
        {} for any other checkpoint (what `mpo-online serve` names and versions a served policy by)."""
        p = Path(path).resolve()
        m = re.fullmatch(r"v(\d+)", p.name)
        if m and p.parent.name == "policies" and (p.parent.parent / "run.json").exists():
            return {"run_dir": str(p.parent.parent), "policy_version": int(m.group(1))}
        return {}

    def has_policy(self, version: int) -> bool:
        d = self.policy_dir(version)
        return (d / "config.json").exists() and any(d.glob("*.safetensors"))

    # --- rounds ---------------------------------------------------------------------------------------------------
    def round_dir(self, r: int) -> Path:
        d = self.root / "rounds" / f"round_{r:04d}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def manifest(self, r: int) -> RoundManifest | None:
        path = self.root / "rounds" / f"round_{r:04d}" / "manifest.json"
        return RoundManifest.from_json(path.read_text()) if path.exists() else None

    def save_manifest(self, m: RoundManifest) -> None:
        write_text_atomic(self.round_dir(m.round) / "manifest.json", m.to_json())

    def advance(self, m: RoundManifest, phase: str, **seconds: float) -> None:
        """Record a finished phase (and how long its steps took) in the manifest, durably."""
        m.seconds.update(seconds)
        m.phase = phase
        self.save_manifest(m)

    def verify_files(self, m: RoundManifest) -> list[str]:
        """Files named in a manifest that are missing or whose checksum changed (a run dir tampered with)."""
        bad = []
        for rel, digest in m.files.items():
            path = self.root / rel
            if not path.exists() or sha256_file(path) != digest:
                bad.append(rel)
        return bad

    def record_file(self, m: RoundManifest, path: str | Path, digest: str | None = None) -> None:
        path = Path(path)
        m.files[str(path.relative_to(self.root))] = digest or sha256_file(path)
