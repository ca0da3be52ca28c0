"""launch/, docker/ and configs/: what a user runs on a cloud before any training code.

Cluster YAMLs are checked against the JSON schema inside the installed ray package and then
through Ray's own ``prepare_config`` + ``validate_config`` (what ``ray up`` runs before it
talks to a cloud); the KubeRay manifest for the fields the operator needs; every config for
loading; the Dockerfiles with hadolint and the submit script with bash -n and shellcheck (both
linters are pinned in the dev extras, so CI runs them); the submit script's dry run (run name,
W&B key passed only through the runtime env; the real job on a local Ray cluster is
tests/e2e/test_submit.py); the GPU benchmark's clean exit without a GPU.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml

from selfclust.config import load_config
from selfclust.train.optim import SGD_MOMENTUM
from tests.helpers.cli_runs import SUBMIT, submit

ROOT = Path(__file__).parents[2]  # the repository
CLUSTERS = sorted((ROOT / "launch").glob("*-gpu-spot.yaml"))
KUBERAY = ROOT / "launch" / "kuberay-rayjob.yaml"
DOCKERFILES = sorted(
    p for p in (ROOT / "docker").glob("Dockerfile.*") if p.suffix != ".dockerignore"
)


def _tool(name: str) -> str:
    """A linter from the venv (dev extras); missing is a failure in CI, a skip elsewhere."""
    found = Path(sys.executable).parent / name
    path = str(found) if found.is_file() else shutil.which(name)
    if path is None:
        msg = f"{name} not installed: pip install -e '.[dev]'"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def _ray_schema() -> dict[str, Any]:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


# ---------------------------------------------------------------- cluster launcher YAMLs


def test_cluster_yamls_exist() -> None:
    assert {p.name for p in CLUSTERS} == {"aws-gpu-spot.yaml", "gcp-gpu-spot.yaml"}


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.stem)
def test_cluster_yaml_valid_for_ray(path: Path) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(path.read_text())
    jsonschema.validate(cfg, _ray_schema())
    # What `ray up` does before any cloud call: merge the provider defaults, then validate
    # (schema again, head type present, sum of min_workers <= max_workers).
    validate_config(prepare_config(copy.deepcopy(cfg)))


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.stem)
def test_cluster_yaml_spot_layout(path: Path) -> None:
    cfg = yaml.safe_load(path.read_text())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert head["resources"].get("GPU", 0) == 0, "Train workers must not land on the head"
    assert workers
    for name, w in workers.items():
        assert w["resources"]["GPU"] >= 1, name
        assert 0 <= w["min_workers"] <= w["max_workers"] <= cfg["max_workers"], name
    provider = cfg["provider"]["type"]
    if provider == "aws":
        assert "InstanceMarketOptions" not in head["node_config"], "head must be on-demand"
        for w in workers.values():
            assert w["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        for t in types.values():  # Ray's built-in AMI is CUDA 11: every type names its own
            assert t["node_config"].get("ImageId"), "set ImageId (driver >= 580 for CUDA 13)"
        assert cfg["provider"]["cache_stopped_nodes"] is False
    else:
        assert provider == "gcp"
        assert "scheduling" not in head["node_config"], "head must be on-demand"
        for w in workers.values():
            sched = w["node_config"]["scheduling"]
            assert sched["provisioningModel"] == "SPOT"
            assert sched["onHostMaintenance"] == "TERMINATE"  # GPUs cannot live-migrate
    # shared storage: mounted on the host, passed into the container, used by setup
    init = " ".join(cfg["initialization_commands"])
    assert "mount" in init and "/shared" in init
    assert "-v /shared:/shared" in cfg["docker"]["run_options"]
    assert "selfclust" in cfg["docker"]["image"] and "gpu" in cfg["docker"]["image"]


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.stem)
def test_cluster_ray_start_logs_at_warning(path: Path) -> None:
    """Every `ray start` keeps Ray's Python logs at WARNING: at INFO the runtime env agent
    writes each job's runtime env (the W&B key from launch/submit.sh) to its log file."""
    cfg = yaml.safe_load(path.read_text())
    starts = [c for k in ("head_start_ray_commands", "worker_start_ray_commands") for c in cfg[k]]
    starts = [c for c in starts if "ray start" in c]
    assert len(starts) == 2
    for c in starts:
        assert "RAY_LOGGER_LEVEL=warning ray start" in c, c


@pytest.mark.parametrize("path", [*CLUSTERS, KUBERAY, SUBMIT], ids=lambda p: p.name)
def test_launch_files_hold_no_secrets(path: Path) -> None:
    text = path.read_text()
    for needle in ("WANDB_API_KEY=", "api_key:", "AKIA", "aws_secret_access_key", "BEGIN RSA"):
        assert needle not in text, f"{path.name} contains {needle!r}"


def test_ray_schema_rejects_broken_cluster() -> None:
    """The validation above can fail: a node type without resources, a negative bound."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(CLUSTERS[0].read_text())
    schema = _ray_schema()
    broken = copy.deepcopy(cfg)
    del broken["available_node_types"]["gpu_spot"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        jsonschema.validate(broken, schema)
    broken = copy.deepcopy(cfg)
    broken["max_workers"] = -1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["gpu_spot"]["min_workers"] = cfg["max_workers"] + 1
    with pytest.raises(ValueError, match="min_workers"):
        validate_config(prepare_config(broken))


# ---------------------------------------------------------------- KubeRay


def _kuberay_docs() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(KUBERAY.read_text()) if d]
    return {d["kind"]: d for d in docs}


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec["template"]["spec"]["containers"]


def test_kuberay_rayjob_fields() -> None:
    docs = _kuberay_docs()
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("selfclust train ")
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__, "keep rayVersion = the pinned ray"
    head = cluster["headGroupSpec"]
    assert "rayStartParams" in head and _containers(head)[0]["image"]
    assert "nvidia.com/gpu" not in json.dumps(_containers(head)), "head is CPU-only"
    groups = cluster["workerGroupSpecs"]
    assert groups
    claim = docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert "ReadWriteMany" in docs["PersistentVolumeClaim"]["spec"]["accessModes"]
    for part in [head, *groups]:
        pod = part["template"]["spec"]
        assert {
            v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        } == {claim}
        for c in pod["containers"]:
            assert "/shared" in {m["mountPath"] for m in c["volumeMounts"]}
            env = {e["name"]: e for e in c.get("env", [])}
            assert "value" not in env["WANDB_API_KEY"], "the key comes from a Secret"
            assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["name"]
    for g in groups:
        assert g["groupName"] and "rayStartParams" in g
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        limits = _containers(g)[0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert g["template"]["spec"]["nodeSelector"], "workers go to spot nodes"


def test_kuberay_entrypoint_config_loads() -> None:
    """The entrypoint's config (baked into the image from configs/) and overrides are valid."""
    argv = shlex.split(_kuberay_docs()["RayJob"]["spec"]["entrypoint"])
    config = Path(argv[2])
    assert config.parent == Path("/opt/selfclust/configs")  # where the Dockerfiles copy it
    overrides = [a for a in argv[3:] if "=" in a and not a.startswith("--")]
    cfg = load_config(ROOT / "configs" / config.name, overrides)
    run_dir = argv[argv.index("--run-dir") + 1]
    assert run_dir.startswith("/shared/") and cfg.ray.address == "auto"
    gpus = sum(
        g["replicas"] * int(_containers(g)[0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in _kuberay_docs()["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert cfg.trainer.use_gpu and cfg.trainer.num_workers == gpus


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_config_loads(path: Path) -> None:
    load_config(path)


def test_imagenet_config_is_selas_recipe() -> None:
    cfg = load_config(ROOT / "configs" / "imagenet_resnet50_sela.yaml")
    m, o = cfg.method, cfg.optim
    assert cfg.model.arch == "resnet50" and not cfg.model.small_stem
    assert (m.heads, m.clusters, m.lam, m.relabel_power, m.init) == (10, 3000, 25, 2.0, "random")
    assert (o.epochs, o.batch_size, o.lr, o.weight_decay) == (400, 256, 0.05, 1e-5)
    assert o.name == "sgd" and SGD_MOMENTUM == 0.9
    assert [round(f * o.epochs) for f in o.milestones] == [150, 300, 350]
    assert cfg.trainer.use_gpu and o.batch_size % cfg.trainer.num_workers == 0


# ---------------------------------------------------------------- docker


def test_dockerfiles_lint_clean() -> None:
    hadolint = _tool("hadolint")
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.gpu"}
    r = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = subprocess.run(
        [hadolint, "-"],
        input="FROM ubuntu\nRUN apt-get install -y curl\n",
        text=True,
        capture_output=True,
    )
    assert bad.returncode != 0 and "DL3006" in bad.stdout  # the linter does bite


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_matches_project(path: Path) -> None:
    """Pins equal pyproject's; every COPY source exists and passes the .dockerignore filter."""
    text = path.read_text()
    pins = re.findall(r'"((?:torch|torchvision)==[0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert len(pins) == 2
    for pin in pins:
        assert f'"{pin}"' in text, f"{path.name} must install {pin} like pyproject.toml"
    ignore = (path.parent / f"{path.name}.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
                assert src.rstrip("/") in allowed, f"{src} is excluded from the build context"


# ---------------------------------------------------------------- submit script


def test_submit_script_lint() -> None:
    r = subprocess.run(["bash", "-n", str(SUBMIT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([_tool("shellcheck"), str(SUBMIT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_submit_dry_run_names_and_secret() -> None:
    key = "sk-test-" + "9f" * 12
    r = submit(
        "--name",
        "r50-sela-001",
        "--dry-run",
        "configs/quickstart.yaml",
        "optim.lr=0.1",
        env={"WANDB_API_KEY": key},
    )
    assert r.returncode == 0, r.stderr
    assert key not in r.stdout + r.stderr
    assert "run dir:      /shared/runs/r50-sela-001\n" in r.stdout
    assert "--submission-id r50-sela-001-20" in r.stdout
    assert "passed via runtime env" in r.stdout
    assert "selfclust train quickstart.yaml --run-dir /shared/runs/r50-sela-001" in r.stdout
    assert r.stdout.rstrip().endswith("ray.address=auto optim.lr=0.1")


def test_submit_forwards_the_socket_interfaces(tmp_path: Path) -> None:
    """NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME (gloo carries every CPU collective between
    nodes) reach the job's runtime env when set; a fake `ray` prints what it was given."""
    fake = tmp_path / "ray"
    fake.write_text(
        '#!/usr/bin/env bash\nwhile [ "$1" != --runtime-env ]; do shift; done\ncat "$2"\n'
    )
    fake.chmod(0o755)
    names = ("WANDB_API_KEY", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_DEBUG")
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", **dict.fromkeys(names, "")}
    ifnames = {"NCCL_SOCKET_IFNAME": "ens5", "GLOO_SOCKET_IFNAME": "ens5"}
    r = submit("--name", "r1", "configs/quickstart.yaml", env={**env, **ifnames})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["env_vars"] == ifnames
    r = submit("--name", "r1", "configs/quickstart.yaml", env=env)
    assert json.loads(r.stdout)["env_vars"] == {}
    r = submit("--name", "r1", "--dry-run", "configs/quickstart.yaml", env={**env, **ifnames})
    assert "GLOO_SOCKET_IFNAME: ens5 (runtime env)\n" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["configs/quickstart.yaml"], "--name '' must be"),
        (["--name", "Has Space", "configs/quickstart.yaml"], "must be 1-63 characters"),
        (["--name", "ok", "configs/nope.yaml"], "config configs/nope.yaml does not exist"),
        (["--name", "ok", "--root", "rel", "configs/quickstart.yaml"], "must be an absolute"),
        (["--name", "ok", "configs/quickstart.yaml", "lr"], "must look like key=value"),
        (["--name", "ok", "--bogus", "configs/quickstart.yaml"], "unknown option --bogus"),
    ],
)
def test_submit_rejects_bad_input(args: list[str], message: str) -> None:
    r = submit(*args, "--dry-run")
    assert r.returncode == 2 and message in r.stderr, r.stderr


# ---------------------------------------------------------------- GPU benchmark


def test_gpu_benchmark_exits_cleanly_without_gpu() -> None:
    """CI has no GPU: the benchmark says so and fails, instead of a CUDA traceback or a hang.
    CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on GPU machines too."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_train.py"), "--steps", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=300,
    )
    assert r.returncode != 0
    assert "gpu_train.py needs a CUDA GPU and found none" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
