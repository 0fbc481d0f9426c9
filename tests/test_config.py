"""Config tree: every shipped YAML validates; overrides, unknown keys and bad values give clear errors."""

from pathlib import Path

import pytest

from mpo_online.config import ConfigError, RunConfig, dump_config, load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "jobs" / "configs").glob("*.yaml"))


def test_configs_directory_is_not_empty():
    assert {p.name for p in CONFIGS} >= {"tiny_cpu.yaml", "gpu_multinode.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # round trip: dumping and reloading gives the same tree and hash
    out = path.parent.parent.parent / ".pytest_cache" / f"roundtrip_{path.name}"
    out.parent.mkdir(exist_ok=True)
    dump_config(cfg, out)
    assert load_config(out) == cfg and load_config(out).hash() == cfg.hash()


def test_extends_lays_a_variant_over_its_base(tmp_path):
    """base sets mpo.beta 0.2 and mpo.w_pref 0.5; the variant extends it and sets mpo.beta 0.3 and trainer.lr 1e-3:
    the merged tree has beta 0.3 (variant wins), w_pref 0.5 (kept from the base section), lr 1e-3; an override
    still wins over both. A cycle (a extends b extends a) and a missing base are clear errors."""
    (tmp_path / "base.yaml").write_text("mpo: {beta: 0.2, w_pref: 0.5}\nloop: {rounds: 7}\n")
    (tmp_path / "variant.yaml").write_text("extends: base.yaml\nmpo: {beta: 0.3}\ntrainer: {lr: 1.0e-3}\n")
    cfg = load_config(tmp_path / "variant.yaml")
    assert (cfg.mpo.beta, cfg.mpo.w_pref, cfg.trainer.lr, cfg.loop.rounds) == (0.3, 0.5, 1e-3, 7)
    assert load_config(tmp_path / "variant.yaml", ["mpo.beta=0.4"]).mpo.beta == 0.4
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "c.yaml")


def test_tiny_default_fits_two_cores_and_uses_paper_mpo_weights():
    cfg = load_config(CONFIGS[[p.name for p in CONFIGS].index("tiny_cpu.yaml")])
    assert (cfg.mpo.w_pref, cfg.mpo.w_quality, cfg.mpo.w_gen, cfg.mpo.beta) == (0.8, 0.2, 1.0, 0.1)
    assert cfg.serving.device == "cpu" and cfg.resources.train_worker_gpus == 0


def test_the_demo_is_mpo_with_the_paper_weights_on_level_4_tasks():
    """scripts/demo.sh's config: the paper's objective, weights and β (issue 27 asks for MPO, not RFT), over
    tiny_cpu.yaml, on its own task directory (a directory written with other levels is refused, not reused)."""
    cfg = load_config(CONFIGS[[p.name for p in CONFIGS].index("demo.yaml")])
    assert cfg.mpo.objective == "mpo" and (cfg.mpo.w_pref, cfg.mpo.w_quality, cfg.mpo.w_gen, cfg.mpo.beta) == \
        (0.8, 0.2, 1.0, 0.1)
    assert cfg.data.levels == [4] and cfg.data.dir != load_config(None).data.dir
    assert "demo.yaml" in (CONFIGS[0].parents[2] / "scripts" / "demo.sh").read_text()


def test_dotted_overrides_are_parsed_as_yaml():
    cfg = load_config(None, ["mpo.beta=0.2", "loop.rounds=3", "data.levels=[1, 2, 3]", "serving.admin_token=null"])
    assert cfg.mpo.beta == 0.2 and cfg.loop.rounds == 3 and cfg.data.levels == [1, 2, 3]
    assert cfg.serving.admin_token is None


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["mpo.bta=0.2"])
    msg = str(err.value)
    assert "unknown key 'mpo.bta'" in msg and "beta" in msg and "w_quality" in msg


def test_unknown_section_is_refused():
    with pytest.raises(ConfigError, match="unknown key 'optimizer'.*trainer"):
        load_config(None, ["optimizer.lr=1"])


def test_bad_values_are_explained():
    with pytest.raises(ConfigError, match="trainer.lr"):
        load_config(None, ["trainer.lr=-1"])
    with pytest.raises(ConfigError, match="mpo.objective"):
        load_config(None, ["mpo.objective=ppo"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["mpo.beta"])
    with pytest.raises(ConfigError, match="set warm_start.stage2_examples too"):
        load_config(None, ["warm_start.stage2_text_drills=100"])


def test_global_batch_must_divide_evenly():
    with pytest.raises(ConfigError, match="global_batch_size"):
        load_config(None, ["trainer.global_batch_size=30", "trainer.micro_batch_size=8"])


def test_cpus_must_cover_engines_training_workers_and_a_data_task():
    """The training workers live for the whole run beside the engines (trainer session): 2 engines x 1 + 2 workers
    x 1 = 4 of 4 CPUs leaves nothing for a 0.25-CPU Ray Data task, and the rollouts would never be scheduled."""
    base = ["resources.num_cpus=4", "resources.serve_replica_cpus=1", "resources.train_workers=2",
            "resources.train_worker_cpus=1", "resources.data_cpus=0.25", "trainer.micro_batch_size=8",
            "trainer.global_batch_size=32"]
    with pytest.raises(ConfigError, match="live for the whole run"):
        load_config(None, base + ["serving.replicas=2"])
    assert load_config(None, base + ["serving.replicas=1"]).serving.replicas == 1
    assert load_config(None, base + ["serving.replicas=2", "resources.num_cpus=null"]).resources.num_cpus is None


def test_objective_weights():
    assert load_config(None, ["mpo.objective=dpo"]).mpo.weights() == (1.0, 0.0, 0.0)
    assert load_config(None, ["mpo.objective=dpo_sft"]).mpo.weights() == (1.0, 0.0, 1.0)
    assert load_config(None, ["mpo.objective=rft"]).mpo.weights() == (0.0, 0.0, 1.0)
    assert load_config(None, ["mpo.w_gen=0.5"]).mpo.weights() == (0.8, 0.2, 0.5)


def test_hash_ignores_round_count_but_not_training_settings():
    base = load_config(None)
    assert load_config(None, ["loop.rounds=9"]).hash() == base.hash()
    assert load_config(None, ["trainer.lr=1e-3"]).hash() != base.hash()
    # where the parts run and how files reach them: the same run (tests/test_online_loop.py compares the weights)
    cluster = load_config(None, ["resources.shared_storage=false", "resources.serve_replica_resources={engine: 1}",
                                 "resources.train_worker_resources={trainer: 1}"])
    assert cluster.resources.serve_replica_resources == {"engine": 1.0} and not cluster.resources.shared_storage
    assert cluster.hash() == base.hash()


def test_chosen_check_modes_match_the_checker():
    """The config's modes are exactly those mpo_online.synthetic.chains.chosen_checker knows; the paper's rule is the
    default."""
    import typing

    from mpo_online.config import PairsConfig
    from mpo_online.synthetic.chains import CHOSEN_CHECKS

    assert typing.get_args(PairsConfig.model_fields["chosen_check"].annotation) == CHOSEN_CHECKS
    assert load_config(None).pairs.chosen_check == "answer"
    assert load_config(None, ["pairs.chosen_check=perceived"]).pairs.chosen_check == "perceived"
    with pytest.raises(ConfigError, match="pairs.chosen_check"):
        load_config(None, ["pairs.chosen_check=luck"])


def _recipe():
    """jobs/online_mpo.py as a module (it is a script, not a package member)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("online_mpo_recipe", CONFIGS[0].parent.parent / "online_mpo.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


def test_rft_rounds_skip_dropout_ntp_continuations():
    """The recipe's rollout kwargs: Dropout-NTP continuations are generated for the pair objectives only (RFT trains
    on the samples, so generating continuations for it would be wasted engine time)."""
    recipe = _recipe()
    assert recipe.rollout_kwargs(load_config(None, ["mpo.objective=mpo"]))["dropout_ntp"] is True
    assert recipe.rollout_kwargs(load_config(None, ["mpo.objective=rft"]))["dropout_ntp"] is False
    assert recipe.rollout_kwargs(load_config(None, ["mpo.objective=dpo", "pairs.dropout_ntp=false"]))["dropout_ntp"] \
        is False


def test_training_calls_add_the_unpaired_prompts_sft_after_the_pairs(tmp_path):
    """A round's data by hand: prompt a has a right and a wrong sample (so one pair), prompt b two right samples (no
    pair), prompt c one wrong sample. mpo: one call on the pairs. mpo + sft.unpaired: the pairs, then an RFT
    call on b's two right samples only (a's right sample is in its pair); + sft.paired: that call also takes a's.
    rft: one call on a's and b's right samples; with sft.mixed_repeats=2, a's twice (a also drew a wrong one).
    (A global batch of 1 row, so the one pair is a training call; with the default 32 it is not: see the end.)"""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mpo_online.data.records import PreferencePair, pairs_to_table
    recipe = _recipe()

    prompts = {p: {"id": p, "question": f"q {p}?", "images": [], "answer": "3", "kind": "qa", "meta": None}
               for p in "abc"}
    samples = [("a", "so 3\nFinal answer: 3", True), ("a", "Final answer: 4", False), ("b", "Final answer: 3", True),
               ("b", "hence 3\nFinal answer: 3", True), ("c", "Final answer: 5", False)]
    pq.write_table(pa.Table.from_pylist([
        {"prompt_id": p, "text": t, "correct": ok, "source": "rollout", "round": 1, "policy_version": 0,
         "final_answer": None, "token_ids": None, "logprobs": None, "sample_index": i}
        for i, (p, t, ok) in enumerate(samples)]), tmp_path / "rollouts.parquet")
    pq.write_table(pairs_to_table([PreferencePair(
        pair_id="p0", prompt_id="a", kind="correctness", question="q a?", images=[], chosen=samples[0][1],
        rejected=samples[1][1])]), tmp_path / "pairs.parquet")

    def calls(*overrides, batch=("resources.train_workers=1", "trainer.micro_batch_size=1",
                                 "trainer.global_batch_size=1")):
        out = recipe.training_calls(load_config(None, [*batch, *overrides]), tmp_path, prompts)
        return [(c.objective, c.rows, sorted(pq.read_table(c.path).column("prompt_id").to_pylist())) for c in out]
    assert calls("mpo.objective=mpo") == [("mpo", 1, ["a"])]
    assert calls("mpo.objective=mpo", "sft.unpaired=true") == [("mpo", 1, ["a"]), ("rft", 2, ["b", "b"])]
    assert calls("mpo.objective=dpo", "sft.unpaired=true")[1] == ("rft", 2, ["b", "b"])
    assert calls("mpo.objective=mpo", "sft.unpaired=true", "sft.paired=true") == [
        ("mpo", 1, ["a"]), ("rft", 3, ["a", "b", "b"])]
    with pytest.raises(ValueError, match="sft.unpaired=true too"):
        load_config(None, ["sft.paired=true"])
    # the keys' old home is refused with their new names (a config written before the move fails loudly, not quietly)
    with pytest.raises(ValueError, match="mpo.sft_unpaired is now sft.unpaired; mpo.rft_mixed_repeats is now "
                                         "sft.mixed_repeats"):
        load_config(None, ["mpo.sft_unpaired=true", "mpo.rft_mixed_repeats=2"])
    assert calls("mpo.objective=rft") == [("rft", 3, ["a", "b", "b"])]
    # sft.mixed_repeats: a drew a wrong sample, so its right one is trained twice (b's, all right, once)
    assert calls("mpo.objective=rft", "sft.mixed_repeats=2") == [("rft", 4, ["a", "a", "b", "b"])]
    # ... RFT's knob only: a preference objective's SFT call lists every chain once
    assert calls("mpo.objective=mpo", "sft.unpaired=true", "sft.paired=true", "sft.mixed_repeats=2") == [
        ("mpo", 1, ["a"]), ("rft", 3, ["a", "b", "b"])]
    # fewer pairs than one global batch: the recipe skips the pair call, so a's right sample goes to the SFT call
    assert calls("mpo.objective=mpo", "sft.unpaired=true", batch=())[1] == ("rft", 3, ["a", "b", "b"])


def test_round_train_metrics_sum_the_calls_of_a_round():
    """mpo (10 steps, 20 pairs, 3.0 s) then rft (30 steps, 40 rows, 5.0 s): the round shows 40 steps, 60 rows, 8.0 s,
    the first call's loss, and both calls' own metrics; a single call's metrics pass through unchanged."""
    recipe = _recipe()
    mpo = {"steps": 10, "pairs": 20, "train_seconds": 3.0, "loss": 0.7, "objective": "mpo"}
    rft = {"steps": 30, "pairs": 40, "train_seconds": 5.0, "loss": 0.1, "objective": "rft"}
    merged = recipe.round_train_metrics({"mpo": mpo, "rft": rft})
    assert (merged["steps"], merged["pairs"], merged["train_seconds"], merged["loss"]) == (40, 60, 8.0, 0.7)
    assert merged["calls"] == {"mpo": mpo, "rft": rft}
    assert recipe.round_train_metrics({"rft": rft}) == rft


def test_the_recipe_checks_the_run_dir_and_the_base_checkpoint_on_every_node(tmp_path):
    """shared_paths (what mpo_online.run.cluster.check_shared_paths gets): the model's config.json once the model
    exists, its parent directory before the job builds it there, and nothing for a checkpoint the job neither has
    nor builds (engines and workers load it by name)."""
    recipe, run = _recipe(), tmp_path / "run"
    model = tmp_path / "artifacts" / "tiny_vlm"
    cfg = load_config(None, [f"model.path={model}"])
    assert recipe.shared_paths(cfg, run) == ({"loop.run_dir": run, "model.path": model.parent}, {})
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    assert recipe.shared_paths(cfg, run) == ({"loop.run_dir": run}, {"model.path": model / "config.json"})
    hub = load_config(None, ["model.path=org/some-vlm", "model.init_if_missing=false"])
    assert recipe.shared_paths(hub, run) == ({"loop.run_dir": run}, {})
