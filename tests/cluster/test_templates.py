"""The cluster templates render to manifests a launcher or KubeRay can take."""

from __future__ import annotations

import shutil

import pytest
import yaml

from anchorless.cluster import templates
from anchorless.cluster.templates import TemplateError, render_template, template_names, write_template

MLFLOW = "https://mlflow.internal.example:5000"
CONFIG = "configs/onenet_coco.yaml"
IMAGE = "registry.example/anchorless:1.2.3"


def _render(name: str, **values):
    values = {"mlflow_tracking_uri": MLFLOW, "image": IMAGE, **values}
    if "train_config" in templates.template_parameters(name):
        values.setdefault("train_config", CONFIG)
    return yaml.safe_load(render_template(name, **values))


def _containers(cluster_spec: dict) -> list[dict]:
    head = cluster_spec["headGroupSpec"]["template"]["spec"]["containers"]
    workers = [c for group in cluster_spec["workerGroupSpecs"] for c in group["template"]["spec"]["containers"]]
    return head + workers


def test_there_is_a_launcher_template_and_both_kuberay_manifests():
    assert template_names() == ["kuberay-raycluster", "kuberay-rayjob", "ray-cluster-aws"]


@pytest.mark.parametrize("name,kind", [("kuberay-raycluster", "RayCluster"), ("kuberay-rayjob", "RayJob")])
def test_kuberay_manifest_has_kind_api_version_metadata_token_auth_and_project_image(name, kind):
    doc = _render(name, namespace="vision", token_secret="ray-token")
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    assert doc["metadata"]["name"] and doc["metadata"]["namespace"] == "vision"
    cluster = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "ray-token"}
    containers = _containers(cluster)
    assert len(containers) == 2
    assert {c["image"] for c in containers} == {IMAGE}
    for container in containers:
        assert {"name": "MLFLOW_TRACKING_URI", "value": MLFLOW} in container["env"]
    worker_limits = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert worker_limits["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("name", ["kuberay-raycluster", "kuberay-rayjob"])
def test_kuberay_containers_take_the_object_stores_aws_variables_from_an_optional_secret(name):
    doc = _render(name, s3_secret="minio-credentials")
    cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    for container in _containers(cluster):
        assert {"secretRef": {"name": "minio-credentials", "optional": True}} in container["envFrom"]
    assert "AWS_ENDPOINT_URL" in render_template(name, mlflow_tracking_uri=MLFLOW, **({"train_config": CONFIG} if name.endswith("job") else {}))


def test_rayjob_runs_anchorless_train_on_the_gpu_workers_with_the_callers_overrides():
    doc = _render("kuberay-rayjob", gpu_workers=3, gpus_per_worker=2, overrides=["training.epochs=24", "name=coco 1x"])
    spec = doc["spec"]
    assert spec["entrypoint"] == (
        f"anchorless train {CONFIG} training.use_gpu=true training.num_workers=6 training.epochs=24 'name=coco 1x'"
    )
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"env_vars": {"MLFLOW_TRACKING_URI": MLFLOW}}
    submitter_env = {e["name"]: e for e in spec["submitterPodTemplate"]["spec"]["containers"][0]["env"]}
    assert submitter_env["RAY_AUTH_MODE"]["value"] == "token"
    token_ref = submitter_env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token_ref == {"name": "anchorless-ray-token", "key": "auth_token"}
    assert spec["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 3


def test_launcher_config_has_required_fields_gpu_workers_project_image_and_token_auth():
    config = _render("ray-cluster-aws", cluster_name="detectors", gpu_instance_type="p4d.24xlarge", max_workers=8)
    assert config["cluster_name"] == "detectors"
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]
    assert config["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"] == "p4d.24xlarge"
    assert config["available_node_types"]["gpu_worker"]["max_workers"] == 8
    assert config["docker"]["image"] == IMAGE
    head_start = " ".join(config["head_start_ray_commands"])
    assert "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/.anchorless/ray_auth_token;" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    assert "$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])
    assert config["file_mounts"] == {
        "~/.anchorless/ray_auth_token": "~/.ray/auth_token",
        "~/.anchorless/mlflow.env": "~/.anchorless/mlflow.env",
    }


@pytest.mark.parametrize("name", ["kuberay-raycluster", "kuberay-rayjob"])
def test_kuberay_containers_log_to_mlflow_as_the_account_in_the_mlflow_secret(name):
    doc = _render(name, mlflow_secret="mlflow-trainer")
    cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    for container in _containers(cluster):
        assert {"secretRef": {"name": "mlflow-trainer", "optional": True}} in container["envFrom"]
        assert not any(item["name"].startswith("MLFLOW_TRACKING_PASS") for item in container["env"])
    text = render_template(name, mlflow_tracking_uri=MLFLOW, **({"train_config": CONFIG} if name.endswith("job") else {}))
    assert "--app-name basic-auth" in text and "registry_auth:authenticate_reserving_aliases" in text


def test_launcher_nodes_read_the_mlflow_credentials_before_ray_starts():
    config = _render("ray-cluster-aws", mlflow_env_file="/secure/mlflow.env")
    assert config["file_mounts"]["~/.anchorless/mlflow.env"] == "/secure/mlflow.env"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        command = config[key][-1]
        assert command.index("set -a; . $HOME/.anchorless/mlflow.env; set +a;") < command.index("ray start")
    assert "MLFLOW_TRACKING_PASSWORD" not in " ".join(config["docker"]["run_options"])


@pytest.mark.parametrize("name", ["ray-cluster-aws", "kuberay-raycluster", "kuberay-rayjob"])
def test_multi_node_templates_keep_ray_on_the_nodes_own_address(name, tmp_path, monkeypatch):
    values = {"mlflow_tracking_uri": MLFLOW, **({"train_config": CONFIG} if name.endswith("job") else {})}
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in render_template(name, **values)
    shutil.copytree(templates.TEMPLATE_DIR, tmp_path, dirs_exist_ok=True)
    path = tmp_path / templates.TEMPLATES[name]
    path.write_text(path.read_text() + "# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0\n")
    monkeypatch.setattr(templates, "TEMPLATE_DIR", tmp_path)
    with pytest.raises(TemplateError, match="would keep every node on loopback"):
        render_template(name, **values)


def test_missing_required_parameter_is_an_error_naming_it():
    expected = r"kuberay-rayjob: missing required parameter\(s\) mlflow_tracking_uri, train_config"
    with pytest.raises(TemplateError, match=expected):
        render_template("kuberay-rayjob")


def test_unknown_parameter_and_unknown_template_are_errors():
    with pytest.raises(TemplateError, match="unknown parameter.*gpu_count"):
        render_template("kuberay-raycluster", mlflow_tracking_uri=MLFLOW, gpu_count=2)
    with pytest.raises(TemplateError, match="unknown template 'slurm'"):
        render_template("slurm")


def test_value_that_would_break_the_yaml_is_refused():
    with pytest.raises(TemplateError, match="image=.*must not contain quotes"):
        render_template("kuberay-raycluster", mlflow_tracking_uri=MLFLOW, image='evil"\nkind: Pod')


def test_a_template_without_token_auth_fails_validation(tmp_path, monkeypatch):
    shutil.copytree(templates.TEMPLATE_DIR, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "kuberay-raycluster.yaml"
    path.write_text(path.read_text().replace("mode: token", "mode: disabled"))
    monkeypatch.setattr(templates, "TEMPLATE_DIR", tmp_path)
    with pytest.raises(TemplateError, match="authOptions.mode must be token"):
        render_template("kuberay-raycluster", mlflow_tracking_uri=MLFLOW)


def test_launcher_config_is_checked_against_rays_own_schema(tmp_path, monkeypatch):
    shutil.copytree(templates.TEMPLATE_DIR, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "ray-cluster-aws.yaml"
    path.write_text(path.read_text().replace("upscaling_speed: 1.0", "upscaling_speed: fast"))
    monkeypatch.setattr(templates, "TEMPLATE_DIR", tmp_path)
    with pytest.raises(TemplateError, match="Ray's cluster-config check failed: 'fast' is not of type 'number'"):
        render_template("ray-cluster-aws", mlflow_tracking_uri=MLFLOW)


def test_write_template_writes_the_rendered_text(tmp_path):
    out = write_template("kuberay-raycluster", tmp_path / "k8s" / "cluster.yaml", mlflow_tracking_uri=MLFLOW)
    assert out.read_text() == render_template("kuberay-raycluster", mlflow_tracking_uri=MLFLOW)
    assert [p.name for p in out.parent.iterdir()] == ["cluster.yaml"]
