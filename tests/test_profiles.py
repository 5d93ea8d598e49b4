"""Params profiles are overlays on params.yaml, run as DVC experiments that leave params.yaml untouched."""

import os
import shutil
import subprocess
import sys

import pytest
import yaml
from test_orchestration import toy_project
from test_pipeline_e2e import REPO

from morer1.errors import BadInputError
from morer1.orchestrate import (
    StageFailed,
    experiment_stage_results,
    load_profile,
    merge_params,
    profiles,
    run_experiment,
    set_param_overrides,
    stale_keys,
)
from morer1.params import load_section, read_params
from morer1.params import section_config as config_class

PROFILES = profiles(REPO)
BENCHMARKS = [p for p in PROFILES if p.startswith("benchmark-")]  # the others only say where stages run


def test_there_are_profiles():
    assert len(BENCHMARKS) >= 4 and set(PROFILES) - set(BENCHMARKS) == {"cluster"}


def test_the_cluster_profile_only_places_training_stages_on_the_gpu_pool():
    from morer1.placement import placement_config

    overlay = load_profile(REPO, "cluster")
    assert set(overlay) == {"placement"}
    assert set_param_overrides(REPO, "cluster") == [f"+placement.pools.{s}='gpu'" for s in
                                                    ("sft", "difficulty", "grpo", "evaluate")]
    assert placement_config(REPO, "cluster").pools == dict.fromkeys(("sft", "difficulty", "grpo", "evaluate"), "gpu")
    assert stale_keys(read_params(REPO / "params.yaml"), {"placement": {"pool": {"sft": "gpu"}}}) == ["placement.pool.sft"]


@pytest.mark.parametrize("profile", PROFILES)
def test_every_key_of_a_profile_exists_in_params_yaml(profile):
    stale = stale_keys(read_params(REPO / "params.yaml"), load_profile(REPO, profile))
    assert not stale, f"profile {profile}: keys not in params.yaml: {', '.join(stale)}"


@pytest.mark.parametrize("profile", PROFILES)
def test_a_profile_merged_onto_params_yaml_validates_against_every_stage_config(profile, tmp_path):
    params = read_params(REPO / "params.yaml")
    merged = merge_params(params, load_profile(REPO, profile))
    for section, values in merged.items():
        config_class(section)(**values)  # raises on a bad value or an unknown key

    # the params.yaml DVC writes for the experiment (`-S` overrides applied by DVC's own code) is that merge,
    # and the stages read it (PyYAML, then the typed configs) as valid params too
    from dvc.utils.hydra import apply_overrides
    from dvc.utils.serialize import load_yaml

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    apply_overrides(tmp_path / "params.yaml", set_param_overrides(REPO, profile))
    assert load_yaml(tmp_path / "params.yaml") == merged
    for section in merged:
        load_section(section, config_class(section), tmp_path / "params.yaml")


@pytest.mark.parametrize("profile", BENCHMARKS)
def test_a_profile_is_a_benchmark_run_on_gpus(profile):
    """What the overlay must get right for the real benchmark (checked on the merged params)."""
    from accelerate.commands.config.config_args import load_config_from_file

    params = read_params(REPO / "params.yaml")
    cfg = {s: config_class(s)(**v) for s, v in merge_params(params, load_profile(REPO, profile)).items()}
    for stage in ("sft", "grpo"):
        accelerate_config = REPO / cfg[stage].accelerate_config
        assert accelerate_config.is_file(), f"{stage}.accelerate_config {accelerate_config} does not exist"
        assert cfg[stage].accelerate_config != "infra/accelerate/cpu.yaml" and cfg[stage].bf16 is True
        assert cfg[stage].lora.enabled is profile.endswith("-lora")
    assert cfg["sft"].model.startswith("/") and "Qwen2.5-VL" in cfg["sft"].model
    assert cfg["rollout"].model == "models/sft"
    assert cfg["synthesize"].teacher == "openai" and cfg["synthesize"].prompt == "full"
    assert cfg["synthesize"].max_facts is None and cfg["synthesize"].openai.base_url.endswith("/v1")
    assert cfg["evaluate"].max_facts is None and cfg["ingest"].source != "data/demo"
    assert cfg["register"].model_name != params["register"]["model_name"]
    processes = load_config_from_file(str(REPO / cfg["grpo"].accelerate_config)).num_processes
    completions = cfg["grpo"].per_device_train_batch_size * processes * cfg["grpo"].gradient_accumulation_steps
    assert completions % cfg["rollout"].num_generations == 0, "TRL: batch x processes x accumulation must divide by the group"


def test_a_stale_key_is_an_error_naming_the_profile_and_the_key(tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "params.yaml").write_text("sft:\n  max_steps: 1\n  lora: {r: 16}\n")
    (tmp_path / "profiles" / "old.yaml").write_text("sft:\n  max_steps: 9\n  lora: {rank: 64}\ngone: {x: 1}\n")
    assert stale_keys(read_params(tmp_path / "params.yaml"), load_profile(tmp_path, "old")) == ["sft.lora.rank", "gone.x"]
    with pytest.raises(BadInputError, match=r"profile old: keys not in params.yaml: sft.lora.rank, gone.x"):
        set_param_overrides(tmp_path, "old")
    with pytest.raises(BadInputError, match="no such params profile; profiles: old"):
        load_profile(tmp_path, "new")


def test_overrides_use_dvc_set_param_grammar(tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "params.yaml").write_text("a: {s: x, f: 1.0, n: 1, l: [a], z: 0, b: false, q: x}\n")
    (tmp_path / "profiles" / "p.yaml").write_text(
        "a: {s: \"http://h:80/v1 it's\", f: 1.0e-5, n: null, l: [q_proj, 2], z: 3, b: true, q: 'true'}\n")
    assert set_param_overrides(tmp_path, "p") == [
        "a.s='http://h:80/v1 it\\'s'", "a.f=1e-05", "a.n=null", "a.l=['q_proj',2]", "a.z=3", "a.b=true", "a.q='true'"]


def _git_status(project) -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True,
                          check=True).stdout


def test_a_profile_run_is_a_dvc_experiment_that_leaves_params_yaml_byte_identical(tmp_path):
    project = toy_project(tmp_path / "toy")
    (project / "profiles").mkdir()
    (project / "profiles" / "big.yaml").write_text("# bigger\na:\n  x: 7\n  names: [r]\n")
    subprocess.run(["git", "add", "profiles"], cwd=project, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "profile"], cwd=project, check=True)
    before = (project / "params.yaml").read_bytes()

    result = run_experiment(project, "big-1", set_param_overrides(project, "big"))
    assert (project / "params.yaml").read_bytes() == before and _git_status(project) == ""
    assert not (project / "first.json").exists()  # the outputs are the experiment's, not the workspace's
    shown = subprocess.run(["git", "show", f"{result['rev']}:params.yaml"], cwd=project, capture_output=True,
                           text=True, check=True).stdout
    assert yaml.safe_load(shown)["a"] == {"x": 7, "lr": 0.002, "names": ["r"]} and "# toy params" in shown
    assert experiment_stage_results(project, result["rev"], ["first", "second", "lonely"]) == [
        {"stage": s, "status": "ran", "seconds": None} for s in ("first", "second", "lonely")]
    listed = subprocess.run([sys.executable, "-m", "dvc", "exp", "list", "--name-only"], cwd=project,
                            capture_output=True, text=True, check=True).stdout.split()
    assert "big-1" in listed

    (project / "profiles" / "broken.yaml").write_text("b:\n  y: fail\n")  # stage `second` exits with 3
    with pytest.raises(StageFailed) as failed:
        run_experiment(project, "broken-1", set_param_overrides(project, "broken"))
    assert failed.value.exit_code == 3 and not failed.value.transient
    assert (project / "params.yaml").read_bytes() == before and _git_status(project) == "?? profiles/broken.yaml\n"


@pytest.mark.e2e
def test_flow_with_a_profile_leaves_git_status_clean(tmp_path):
    """`python flows/pipeline.py --profile X` on a toy project: a DVC experiment, recorded, params.yaml untouched."""
    project = toy_project(tmp_path / "toy")
    (project / "profiles").mkdir()
    (project / "profiles" / "big.yaml").write_text("a:\n  x: 7\n")
    subprocess.run(["git", "add", "profiles"], cwd=project, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "profile"], cwd=project, check=True)
    before = (project / "params.yaml").read_bytes()
    env = dict(os.environ, MORER1_STATE_DIR=str(project / ".state"), PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, str(REPO / "flows" / "pipeline.py"), "--project-dir", str(project),
                           "--profile", "big"], cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (project / "params.yaml").read_bytes() == before and _git_status(project) == ""
    listed = subprocess.run([sys.executable, "-m", "dvc", "exp", "list", "--name-only"], cwd=project,
                            capture_output=True, text=True, check=True).stdout.split()
    assert len(listed) == 1 and listed[0].startswith("big-")
