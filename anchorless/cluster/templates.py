"""Render and validate the cluster templates in ``anchorless/cluster/templates/``.

Three templates, each YAML with ``${name}`` placeholders (``string.Template``;
``$$`` is a literal ``$``):

* ``ray-cluster-aws``: a Ray cluster-launcher config (``ray up``) for AWS with
  autoscaling GPU workers, every node in the anchorless image;
* ``kuberay-raycluster``: a KubeRay ``RayCluster`` with a GPU worker group;
* ``kuberay-rayjob``: a KubeRay ``RayJob`` that runs ``anchorless train``.

All run with Ray token authentication on and send runs to an external MLflow
tracking server (``mlflow_tracking_uri``, required), logging as a plain account whose
``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` every node reads before Ray starts: from the
Secret ``mlflow_secret`` (KubeRay), or from ``mlflow_env_file`` copied to every node (the
launcher). Each documents the server's basic-auth set-up that reserves moving aliases to
its admin account, as ``cluster up --local`` runs it. Unlike the local cluster, they keep
Ray on each node's own address: the nodes must reach one another. The KubeRay containers take the
object store's standard AWS variables from an optional Secret (``s3_secret``); the
launcher config documents the instance profile or ``--env`` options that do the same. ``render_template`` fills
the placeholders from ``PARAMETERS`` and the caller's values, parses the result
and checks what a cluster needs (see ``validate_rendered``), so a template that
renders is one that a launcher or the KubeRay operator can take.
"""

from __future__ import annotations

import importlib.metadata
import shlex
from pathlib import Path
from string import Template
from typing import Any, Sequence

import yaml

import anchorless
from anchorless.errors import AnchorlessError
from anchorless.files import write_atomic

TEMPLATE_DIR = Path(__file__).with_name("templates")
TEMPLATES = {
    "ray-cluster-aws": "ray-cluster-aws.yaml",
    "kuberay-raycluster": "kuberay-raycluster.yaml",
    "kuberay-rayjob": "kuberay-rayjob.yaml",
}

# Every parameter a template may use, with its default; None means required.
PARAMETERS: dict[str, Any] = {
    "cluster_name": "anchorless",
    "job_name": "anchorless-train",
    "namespace": "default",
    "image": f"anchorless:{anchorless.__version__}",
    "ray_version": importlib.metadata.version("ray"),
    "mlflow_tracking_uri": None,
    "token_secret": "anchorless-ray-token",
    "s3_secret": "anchorless-s3",  # optional Secret with the AWS_* variables of the object store
    "mlflow_secret": "anchorless-mlflow",  # Secret with MLFLOW_TRACKING_USERNAME/PASSWORD (the plain account)
    "mlflow_env_file": "~/.anchorless/mlflow.env",  # the same two variables, for the launcher's nodes
    "token_file": "~/.ray/auth_token",
    "region": "us-west-2",
    "head_instance_type": "m5.2xlarge",
    "gpu_instance_type": "g5.2xlarge",
    "head_cpus": 4,
    "head_memory": "16Gi",
    "gpu_workers": 2,
    "min_gpu_workers": 0,
    "max_workers": 4,
    "gpus_per_worker": 1,
    "cpus_per_worker": 8,
    "memory_per_worker": "32Gi",
    "train_config": None,
    "overrides": (),
}

KUBERAY_API_VERSION = "ray.io/v1"
# Ray's single-machine switch, which the local cluster sets: a multi-node template never may.
_SINGLE_MACHINE_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class TemplateError(AnchorlessError):
    """A template that cannot be rendered, or whose rendering is not a usable manifest."""


def template_names() -> list[str]:
    return sorted(TEMPLATES)


def _template(name: str) -> Template:
    if name not in TEMPLATES:
        raise TemplateError(f"unknown template {name!r}; expected one of {', '.join(template_names())}")
    return Template((TEMPLATE_DIR / TEMPLATES[name]).read_text())


def template_parameters(name: str) -> dict[str, Any]:
    """The parameters ``name`` uses and their defaults (None = required)."""
    used = set(_template(name).get_identifiers())
    if "train_command" in used:
        used |= {"train_config", "overrides", "gpu_workers", "gpus_per_worker"}
    return {key: PARAMETERS[key] for key in PARAMETERS if key in used}


def train_command(train_config: str, overrides: Sequence[str], workers: int) -> str:
    """``anchorless train CONFIG`` on ``workers`` GPU workers, then the caller's overrides."""
    return shlex.join(
        ["anchorless", "train", train_config, "training.use_gpu=true", f"training.num_workers={workers}", *overrides]
    )


def render_template(name: str, **values: Any) -> str:
    """The rendered YAML text of template ``name``; raises TemplateError on a bad value or manifest."""
    template = _template(name)
    unknown = sorted(set(values) - set(PARAMETERS))
    if unknown:
        known = ", ".join(PARAMETERS)
        raise TemplateError(f"{name}: unknown parameter(s) {', '.join(unknown)}; expected some of {known}")
    params = template_parameters(name)
    merged = {key: values.get(key, default) for key, default in params.items()}
    missing = sorted(key for key, value in merged.items() if value is None)
    if missing:
        raise TemplateError(f"{name}: missing required parameter(s) {', '.join(missing)}")
    if isinstance(merged.get("overrides"), str):
        raise TemplateError(f"{name}: overrides must be a list of key.path=value strings, got a string")
    for key, value in merged.items():
        text = str(value) if key != "overrides" else " ".join(value)
        if any(char in text for char in '"\\\n'):
            raise TemplateError(f"{name}: parameter {key}={text!r} must not contain quotes, backslashes or newlines")
    if "train_config" in merged:
        workers = int(merged["gpu_workers"]) * int(merged["gpus_per_worker"])
        merged["train_command"] = train_command(str(merged["train_config"]), list(merged["overrides"]), workers)
    rendered = template.substitute({key: str(value) for key, value in merged.items()})
    validate_rendered(name, rendered, merged)
    return rendered


def write_template(name: str, out_path: str | Path, **values: Any) -> Path:
    """Render ``name`` and write it atomically to ``out_path``."""
    text = render_template(name, **values)
    return write_atomic(out_path, text)


# --------------------------------------------------------------------------- validation


def _get(doc: Any, dotted: str, where: str) -> Any:
    node = doc
    for part in dotted.split("."):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise TemplateError(f"{where}: missing {dotted}")
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise TemplateError(f"{where}: missing {dotted}")
    return node


def _expect(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise TemplateError(f"{where}: {message}")


def _expect_equal(actual: Any, expected: Any, where: str, what: str) -> None:
    _expect(actual == expected, where, f"{what} is {actual!r}, expected {expected!r}")


def validate_rendered(name: str, text: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Parse a rendered template and check the fields a cluster needs; returns the YAML documents."""
    try:
        docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise TemplateError(f"{name}: rendered text is not valid YAML: {exc}") from None
    _expect(len(docs) == 1 and isinstance(docs[0], dict), name, "expected exactly one YAML mapping")
    _expect(_SINGLE_MACHINE_SWITCH not in text, name, f"{_SINGLE_MACHINE_SWITCH} would keep every node on loopback")
    doc = docs[0]
    if name == "ray-cluster-aws":
        _validate_launcher(doc, params, name)
    elif name == "kuberay-raycluster":
        _validate_kuberay_meta(doc, "RayCluster", params, name)
        _validate_raycluster_spec(_get(doc, "spec", name), params, f"{name}: spec")
    elif name == "kuberay-rayjob":
        _validate_kuberay_meta(doc, "RayJob", params, name)
        _validate_rayjob_spec(_get(doc, "spec", name), params, f"{name}: spec")
    return docs


def _validate_kuberay_meta(doc: dict[str, Any], kind: str, params: dict[str, Any], where: str) -> None:
    _expect_equal(doc.get("apiVersion"), KUBERAY_API_VERSION, where, "apiVersion")
    _expect_equal(doc.get("kind"), kind, where, "kind")
    _expect(bool(_get(doc, "metadata.name", where)), where, "metadata.name is empty")
    _expect_equal(_get(doc, "metadata.namespace", where), params["namespace"], where, "metadata.namespace")


def _validate_rayjob_spec(spec: dict[str, Any], params: dict[str, Any], where: str) -> None:
    entrypoint = _get(spec, "entrypoint", where)
    _expect(str(entrypoint).startswith("anchorless train "), where, "entrypoint must run `anchorless train`")
    _expect_equal(entrypoint, params["train_command"], where, "entrypoint")
    runtime_env = yaml.safe_load(_get(spec, "runtimeEnvYAML", where))
    tracking = _get(runtime_env, "env_vars.MLFLOW_TRACKING_URI", f"{where}.runtimeEnvYAML")
    _expect_equal(tracking, params["mlflow_tracking_uri"], where, "runtimeEnvYAML env_vars.MLFLOW_TRACKING_URI")
    submitter = _get(spec, "submitterPodTemplate.spec.containers.0", where)
    env = {item["name"]: item for item in submitter.get("env", [])}
    _expect_equal(env.get("RAY_AUTH_MODE", {}).get("value"), "token", where, "the submitter's RAY_AUTH_MODE")
    secret = _get(env.get("RAY_AUTH_TOKEN", {}), "valueFrom.secretKeyRef.name", f"{where}: submitter RAY_AUTH_TOKEN")
    _expect_equal(secret, params["token_secret"], where, "the submitter's RAY_AUTH_TOKEN secret")
    _validate_raycluster_spec(_get(spec, "rayClusterSpec", where), params, f"{where}.rayClusterSpec")


def _validate_raycluster_spec(spec: dict[str, Any], params: dict[str, Any], where: str) -> None:
    _expect_equal(str(_get(spec, "rayVersion", where)), params["ray_version"], where, "rayVersion")
    _expect(_get(spec, "authOptions.mode", where) == "token", where, "authOptions.mode must be token")
    _expect_equal(_get(spec, "authOptions.secretName", where), params["token_secret"], where, "authOptions.secretName")
    _get(spec, "headGroupSpec.rayStartParams", where)
    containers = [("head", _get(spec, "headGroupSpec.template.spec.containers.0", where))]
    groups = _get(spec, "workerGroupSpecs", where)
    _expect(isinstance(groups, list) and len(groups) > 0, where, "workerGroupSpecs is empty")
    for index, group in enumerate(groups):
        group_where = f"{where}.workerGroupSpecs[{index}]"
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams"):
            _get(group, key, group_where)
        in_range = group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        _expect(in_range, group_where, "needs minReplicas <= replicas <= maxReplicas")
        worker = _get(group, "template.spec.containers.0", group_where)
        gpus = _get(worker, "resources.limits", group_where).get("nvidia.com/gpu")
        _expect(gpus is not None and float(gpus) > 0, group_where, "worker containers must request nvidia.com/gpu")
        containers.append((group["groupName"], worker))
    for role, container in containers:
        _expect_equal(container.get("image"), params["image"], where, f"the {role} image")
        env = {item["name"]: item.get("value") for item in container.get("env", [])}
        tracking = env.get("MLFLOW_TRACKING_URI")
        _expect_equal(tracking, params["mlflow_tracking_uri"], where, f"the {role} container's MLFLOW_TRACKING_URI")
        secrets = [item.get("secretRef", {}).get("name") for item in container.get("envFrom", [])]
        _expect(params["s3_secret"] in secrets, where, f"the {role} container must take its AWS_* variables from {params['s3_secret']}")
        _expect(
            params["mlflow_secret"] in secrets, where,
            f"the {role} container must take its MLflow credentials from {params['mlflow_secret']}",
        )  # fmt: skip


def _validate_launcher(config: dict[str, Any], params: dict[str, Any], where: str) -> None:
    for key in ("cluster_name", "provider", "head_node_type", "available_node_types", "max_workers"):
        _get(config, key, where)
    node_types = config["available_node_types"]
    _expect(config["head_node_type"] in node_types, where, "head_node_type is not one of available_node_types")
    _expect_equal(_get(config, "docker.image", where), params["image"], where, "docker.image")
    workers = [node for name, node in node_types.items() if name != config["head_node_type"]]
    worker_instances = [_get(node, "node_config.InstanceType", where) for node in workers]
    _expect(params["gpu_instance_type"] in worker_instances, where, "no worker node type uses the GPU instance type")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = " ".join(_get(config, key, where))
        _expect("RAY_AUTH_MODE=token" in commands, where, f"{key} must start Ray with RAY_AUTH_MODE=token")
        _expect(". $HOME/.anchorless/mlflow.env" in commands, where, f"{key} must read the MLflow credentials before Ray starts")
    head_start = " ".join(config["head_start_ray_commands"])
    _expect("--dashboard-host=127.0.0.1" in head_start, where, "the dashboard must bind 127.0.0.1 on the head")
    mounts = _get(config, "file_mounts", where)
    _expect_equal(mounts.get("~/.anchorless/mlflow.env"), params["mlflow_env_file"], where, "the MLflow credentials' file mount")
    run_options = " ".join(_get(config, "docker.run_options", where))
    tracking = f"MLFLOW_TRACKING_URI={params['mlflow_tracking_uri']}"
    _expect(tracking in run_options, where, "docker.run_options must pass MLFLOW_TRACKING_URI")
    # Ray's own schema and defaults, as `ray up` applies them (a private module, but the one `ray up` uses).
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(config))
    except Exception as exc:  # jsonschema.ValidationError or ValueError, both with a readable message
        message = getattr(exc, "message", None) or str(exc)
        raise TemplateError(f"{where}: Ray's cluster-config check failed: {message}") from None
