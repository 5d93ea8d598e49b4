"""Infrastructure that cannot run here (GPUs, clusters, servers): it parses, validates and dry-runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from morer1.params import SECTIONS, load_section, section_config

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params.yaml"
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))
ACCELERATE = sorted((ROOT / "infra" / "accelerate").glob("*.yaml"))
BENCHMARK = {f"benchmark-qwen2.5-vl-{size}-{mode}.yaml" for size in ("3b", "7b") for mode in ("lora", "full")}


def test_demo_params_still_load():
    for section in SECTIONS:
        load_section(section, section_config(section), PARAMS)


@pytest.mark.parametrize("config", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_loads_and_dry_runs(config):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    loaded = load_config_from_file(str(config))
    assert isinstance(loaded, ClusterConfig)
    # What `accelerate launch --config_file X -m morer1 sft ...` resolves before it spawns anything.
    args = launch_command_parser().parse_args(
        ["--config_file", str(config), "-m", "morer1", "sft", "--data", "data/sft", "--out", "models/sft"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == loaded.num_processes and args.num_machines == loaded.num_machines
    if "zero" in config.name:
        assert args.use_deepspeed and str(args.zero_stage) == config.stem.rsplit("zero", 1)[1]
        assert args.mixed_precision == "bf16"


def test_accelerate_configs_cover_one_gpu_to_multi_node():
    assert {p.name for p in ACCELERATE} >= {
        "cpu.yaml", "gpu.yaml", "multi_gpu_zero2.yaml", "multi_gpu_zero3.yaml", "multi_node_zero3.yaml"}


SBATCH = ROOT / "infra" / "slurm" / "train.sbatch"


def _sbatch(*args, **env):
    return subprocess.run(["bash", str(SBATCH), *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "MORER1_DRY_RUN": "1", "MORER1_PROJECT_DIR": str(ROOT), **env})


def test_sbatch_syntax():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True, capture_output=True)
    assert "#SBATCH --gpus-per-node" in SBATCH.read_text()


def test_sbatch_one_node_runs_the_dvc_stage():
    out = _sbatch("sft", SLURM_NNODES="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].strip() == "dvc repro sft"


def test_sbatch_several_nodes_launch_the_stage_command_of_dvc_yaml():
    out = _sbatch("grpo", SLURM_NNODES="2", GPUS_PER_NODE="8", MASTER_ADDR="node001")
    assert out.returncode == 0, out.stderr
    launch = out.stdout.replace("\\", "")
    assert "srun --nodes=2" in launch and "--machine_rank $SLURM_NODEID" in launch
    assert "--main_process_ip node001" in launch and "--num_processes 16" in launch
    stage_cmd = " ".join(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["grpo"]["cmd"].split())
    assert stage_cmd.split("-m morer1 ", 1)[1] in " ".join(launch.split())  # same arguments as dvc.yaml
    assert out.stdout.splitlines()[-1].strip() == "dvc commit --force grpo"
    assert _sbatch("nonsense").returncode == 2


def test_k8s_job_requests_gpus_and_runs_a_stage():
    job = yaml.safe_load((ROOT / "infra" / "k8s" / "train-job.yaml").read_text())
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert "dvc repro" in "\n".join(container["command"] + container["args"])
    assert {e["name"]: e.get("value") for e in container["env"]}["STAGE"] in ("sft", "grpo")


def test_compose_names_the_team_services_and_ports():
    compose = yaml.safe_load((ROOT / "infra" / "servers" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"mlflow", "prefect", "minio", "mlflow-db", "prefect-db", "minio-init"} <= set(services)
    ports = {name: {p.split(":")[-1] for p in s.get("ports", [])} for name, s in services.items()}
    assert ports["mlflow"] == {"5000"} and ports["prefect"] == {"4200"} and "9000" in ports["minio"]
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri postgresql://" in mlflow_cmd and "--artifacts-destination s3://" in mlflow_cmd
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    prefect_db = services["prefect"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and "@prefect-db:" in prefect_db
    assert "mc mb" in " ".join(services["minio-init"]["command"])


def test_confusion_plots_use_the_symlog_template_and_dvc_plots_is_ignored():
    """`dvc plots show` draws the confusion matrices with `.dvc/plots/confusion_log.json` (DVC's own confusion
    template with a symlog colour scale), so the none->none cell no longer washes out every other cell; the page
    it writes (`dvc_plots/`) is git-ignored."""
    import json

    from dvc_render.vega import VegaRenderer

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    plots = {name: props for entry in stages["evaluate"]["plots"] for name, props in entry.items()}
    for split in ("dev", "test"):
        assert plots[f"reports/eval/{split}_confusion.csv"] == {"template": "confusion_log", "x": "predicted",
                                                                 "y": "actual"}
    # rendered as DVC renders it (custom templates are looked up in <repo>/.dvc/plots), on a lopsided matrix
    data = ([{"actual": "none", "predicted": "none", "rev": "workspace"}] * 900
            + [{"actual": "/per/misc/nationality", "predicted": "none", "rev": "workspace"}] * 3
            + [{"actual": "none", "predicted": "/per/misc/nationality", "rev": "workspace"}] * 7)
    renderer = VegaRenderer(data, "reports/eval/dev_confusion.csv", template="confusion_log",
                            template_dir=str(ROOT / ".dvc" / "plots"), x="predicted", y="actual")
    spec = renderer.get_filled_template()
    text = json.dumps(spec)
    assert "<DVC_METRIC" not in text and spec["data"]["values"]
    assert spec["spec"]["layer"][0]["encoding"]["color"]["scale"]["type"] == "symlog"
    assert spec["params"][0]["value"] is True  # the counts are written in the cells
    assert spec["spec"]["encoding"]["x"]["field"] == "predicted" and spec["spec"]["encoding"]["y"]["field"] == "actual"
    ignored = subprocess.run(["git", "check-ignore", "-q", "dvc_plots/index.html"], cwd=ROOT)
    assert ignored.returncode == 0, "dvc_plots/ (what `dvc plots show` writes) is not git-ignored"
