"""Render and validate the cluster templates in ``anchorless/cluster/templates/``.

Three templates, each YAML with ``${name}`` placeholders (``string.Template``;
``$$`` is a literal ``$``):

* ``ray-cluster-aws``: a Ray cluster-launcher config (``ray up``) for AWS with
  autoscaling GPU workers, every node in the anchorless image;
* ``kuberay-raycluster``: a KubeRay ``RayCluster`` with a GPU worker group;
* ``kuberay-rayjob``: a KubeRay ``RayJob`` that runs ``anchorless train``.

All run with Ray token authentication on and send runs to an external MLflow
tracking server (``mlflow_tracking_uri``, required). ``render_template`` fills
the placeholders from ``PARAMETERS`` and the caller's values, parses the result
and checks what a cluster needs (see ``validate_rendered``), so a template that
renders is one that a launcher or the KubeRay operator can take.
"""

from __future__ import annotations

import importlib.metadata
import os
import shlex
import tempfile
from pathlib import Path
from string import Template
from typing import Any, Sequence

import yaml

import anchorless
from anchorless.platform.errors import AnchorlessError

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
# Computed from the others, never passed in.
_DERIVED = ("train_command",)

KUBERAY_API_VERSION = "ray.io/v1"


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
        raise TemplateError(f"{name}: unknown parameter(s) {', '.join(unknown)}; expected some of {', '.join(PARAMETERS)}")
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
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, out_path)
    return out_path


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


def validate_rendered(name: str, text: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Parse a rendered template and check the fields a cluster needs; returns the YAML documents."""
    try:
        docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise TemplateError(f"{name}: rendered text is not valid YAML: {exc}") from None
    _expect(len(docs) == 1 and isinstance(docs[0], dict), name, "expected exactly one YAML mapping")
    doc = docs[0]
    if name == "ray-cluster-aws":
        _validate_launcher(doc, params, name)
    elif name == "kuberay-raycluster":
        _validate_kuberay_meta(doc, "RayCluster", params, name)
        _validate_raycluster_spec(_get(doc, "spec", name), params, f"{name}: spec")
    elif name == "kuberay-rayjob":
        _validate_kuberay_meta(doc, "RayJob", params, name)
        spec = _get(doc, "spec", name)
        _expect(spec.get("entrypoint") == params["train_command"], name, f"spec.entrypoint is {spec.get('entrypoint')!r}, expected {params['train_command']!r}")
        _expect(str(spec["entrypoint"]).startswith("anchorless train "), name, "spec.entrypoint must run `anchorless train`")
        runtime_env = yaml.safe_load(_get(spec, "runtimeEnvYAML", name))
        _expect(
            _get(runtime_env, "env_vars.MLFLOW_TRACKING_URI", f"{name}: runtimeEnvYAML") == params["mlflow_tracking_uri"],
            name,
            "runtimeEnvYAML must set env_vars.MLFLOW_TRACKING_URI",
        )
        submitter = _get(spec, "submitterPodTemplate.spec.containers.0", name)
        env = {item["name"]: item for item in submitter.get("env", [])}
        _expect(env.get("RAY_AUTH_MODE", {}).get("value") == "token", name, "the submitter must set RAY_AUTH_MODE=token")
        _expect(
            _get(env.get("RAY_AUTH_TOKEN", {}), "valueFrom.secretKeyRef.name", f"{name}: submitter RAY_AUTH_TOKEN") == params["token_secret"],
            name,
            "the submitter must take RAY_AUTH_TOKEN from the token secret",
        )
        _validate_raycluster_spec(_get(spec, "rayClusterSpec", name), params, f"{name}: spec.rayClusterSpec")
    return docs


def _validate_kuberay_meta(doc: dict[str, Any], kind: str, params: dict[str, Any], where: str) -> None:
    _expect(doc.get("apiVersion") == KUBERAY_API_VERSION, where, f"apiVersion must be {KUBERAY_API_VERSION}")
    _expect(doc.get("kind") == kind, where, f"kind must be {kind}")
    _expect(bool(_get(doc, "metadata.name", where)), where, "metadata.name is empty")
    _expect(_get(doc, "metadata.namespace", where) == params["namespace"], where, "metadata.namespace differs from the parameter")


def _validate_raycluster_spec(spec: dict[str, Any], params: dict[str, Any], where: str) -> None:
    _expect(str(_get(spec, "rayVersion", where)) == params["ray_version"], where, "rayVersion differs from the parameter")
    _expect(_get(spec, "authOptions.mode", where) == "token", where, "authOptions.mode must be token")
    _expect(_get(spec, "authOptions.secretName", where) == params["token_secret"], where, "authOptions.secretName differs")
    _get(spec, "headGroupSpec.rayStartParams", where)
    containers = [("head", _get(spec, "headGroupSpec.template.spec.containers.0", where))]
    groups = _get(spec, "workerGroupSpecs", where)
    _expect(isinstance(groups, list) and len(groups) > 0, where, "workerGroupSpecs is empty")
    for index, group in enumerate(groups):
        group_where = f"{where}.workerGroupSpecs[{index}]"
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams"):
            _get(group, key, group_where)
        _expect(group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group_where, "needs minReplicas <= replicas <= maxReplicas")
        worker = _get(group, "template.spec.containers.0", group_where)
        gpus = _get(worker, "resources.limits", group_where).get("nvidia.com/gpu")
        _expect(gpus is not None and float(gpus) > 0, group_where, "worker containers must request nvidia.com/gpu")
        containers.append((group["groupName"], worker))
    for role, container in containers:
        _expect(container.get("image") == params["image"], where, f"{role} image is {container.get('image')!r}, expected {params['image']!r}")
        env = {item["name"]: item.get("value") for item in container.get("env", [])}
        _expect(env.get("MLFLOW_TRACKING_URI") == params["mlflow_tracking_uri"], where, f"{role} container must set MLFLOW_TRACKING_URI")


def _validate_launcher(config: dict[str, Any], params: dict[str, Any], where: str) -> None:
    for key in ("cluster_name", "provider", "head_node_type", "available_node_types", "max_workers"):
        _get(config, key, where)
    _expect(config["head_node_type"] in config["available_node_types"], where, "head_node_type is not one of available_node_types")
    _expect(_get(config, "docker.image", where) == params["image"], where, f"docker.image must be {params['image']!r}")
    workers = [node for name, node in config["available_node_types"].items() if name != config["head_node_type"]]
    _expect(
        any(_get(node, "node_config.InstanceType", where) == params["gpu_instance_type"] for node in workers),
        where,
        "no worker node type uses the GPU instance type",
    )
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = " ".join(_get(config, key, where))
        _expect("RAY_AUTH_MODE=token" in commands, where, f"{key} must start Ray with RAY_AUTH_MODE=token")
    _expect("--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"]), where, "the dashboard must bind 127.0.0.1 on the head")
    _expect(
        any(f"MLFLOW_TRACKING_URI={params['mlflow_tracking_uri']}" in option for option in _get(config, "docker.run_options", where)),
        where,
        "docker.run_options must pass MLFLOW_TRACKING_URI",
    )
    # Ray's own schema and defaults, as `ray up` applies them.
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(config))
    except Exception as exc:  # jsonschema.ValidationError or ValueError, both with a readable message
        message = getattr(exc, "message", None) or str(exc)
        raise TemplateError(f"{where}: Ray's cluster-config check failed: {message}") from None
