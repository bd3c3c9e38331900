"""The logged pyfunc model holds data only: its code is the installed package's, and a logged
model whose MLmodel would load code from the artifact store is refused before any of it runs."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import mlflow.artifacts
import mlflow.pyfunc
import pytest
import yaml

from anchorless.platform.models import onnx_pyfunc, pyfunc
from anchorless.platform.models.export import ModelError, read_export
from anchorless.platform.models.loading import load_model
from anchorless.platform.models.serving import served_model
from anchorless.platform.tracking.store import mlflow_store

CODE_SUFFIXES = {".py", ".pyc", ".pkl", ".pickle", ".cloudpickle"}
MARKER = "artifact-code-ran"  # what the planted code writes, in its own directory, if it ever runs


@pytest.fixture(scope="module")
def logged(registered, tmp_path_factory) -> Path:
    """The registered version's logged model, as ``mlflow models serve`` would download it."""
    store = registered.tracker.tracking_uri
    with mlflow_store(store):
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=registered.uri, dst_path=str(tmp_path_factory.mktemp("logged")), tracking_uri=store
        )
    return Path(path)


def _flavour(model_dir: Path) -> dict:
    return yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]


def test_the_logged_model_holds_data_only_and_names_the_package_module_as_its_loader(logged):
    files = [path.relative_to(logged) for path in logged.rglob("*") if path.is_file()]
    assert not [f for f in files if f.suffix in CODE_SUFFIXES], files
    assert not any(f.parts[0] == "code" for f in files), files
    flavour = _flavour(logged)
    assert flavour["loader_module"] == "anchorless.platform.models.pyfunc" == pyfunc.__name__
    assert not flavour.get("code") and "model_code_path" not in flavour
    assert flavour["data"] == "data/model.pt"
    assert read_export(logged / flavour["data"])["format"] == "anchorless-model"  # weights-only: plain data
    pyfunc.check_logged_model(logged)
    loaded = mlflow.pyfunc.load_model(str(logged))
    assert loaded.loader_module == pyfunc.__name__
    assert [p.name for p in loaded.metadata.get_params_schema().params] == ["score_threshold"]
    assert loaded.metadata.get_input_schema().input_names() == ["image"]


def test_the_onnx_servers_model_holds_only_the_graph_and_names_its_torch_free_loader(exported, tmp_path):
    model_dir = onnx_pyfunc.save_onnx_pyfunc(exported.out / "model.onnx", tmp_path / "onnx-pyfunc")
    files = [path.relative_to(model_dir) for path in model_dir.rglob("*") if path.is_file()]
    assert not [f for f in files if f.suffix in CODE_SUFFIXES], files
    flavour = _flavour(model_dir)
    assert flavour["loader_module"] == onnx_pyfunc.__name__ and not flavour.get("code")
    assert flavour["data"] == "data/model.onnx"


def _tampered(logged: Path, tmp_path: Path, name: str, flavour: dict, files: dict[str, str]) -> Path:
    """A copy of the logged model with its pyfunc flavour changed (None: a key removed) and ``files`` planted."""
    model_dir = tmp_path / name
    shutil.copytree(logged, model_dir)
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    conf = mlmodel["flavors"]["python_function"]
    conf.update(flavour)
    for key in [key for key, value in conf.items() if value is None]:
        del conf[key]
    (model_dir / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    for relative, text in files.items():
        (model_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (model_dir / relative).write_text(text.format(marker=str(model_dir / MARKER)))
    return model_dir


PLANTED = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"
LOADER = PLANTED + "def _load_pyfunc(path):\n    raise SystemExit('planted loader')\n"
TAMPERED = {
    # another loader module, shipped in the artifact's code directory (MLflow puts it on sys.path)
    "other loader": ({"loader_module": "planted_loader", "code": "code"}, {"code/planted_loader.py": LOADER}),
    # our module's name, but a package of that name in the code directory, first on sys.path
    "shadowing package": ({"code": "code"}, {"code/anchorless/__init__.py": PLANTED}),
    # a models-from-code file, as MLflow runs them
    "models from code": (
        {"loader_module": "mlflow.pyfunc.model", "model_code_path": "planted.py"},
        {"planted.py": PLANTED + "from mlflow.models import set_model\nset_model(lambda model_input: model_input)\n"},
    ),
}


@pytest.mark.parametrize("case", TAMPERED)
def test_a_tampered_mlmodel_is_refused_before_serving_and_none_of_its_code_runs(case, logged, registered, tmp_path):
    flavour, files = TAMPERED[case]
    model_dir = _tampered(logged, tmp_path, case.replace(" ", "-"), flavour, files)
    store = registered.tracker.tracking_uri
    with pytest.raises(ModelError, match="anchorless loads only models whose code is the installed package's"):
        served_model(str(model_dir), format="torch", tracking_uri=store, workdir=tmp_path / "work")
    assert not (model_dir / MARKER).exists()


def test_mlflow_itself_would_run_the_planted_loader(logged, tmp_path, monkeypatch):
    """What the check above prevents is real: MLflow imports whatever loader module the MLmodel names."""
    flavour, files = TAMPERED["other loader"]
    model_dir = _tampered(logged, tmp_path, "other-loader", flavour, files)
    monkeypatch.setattr(sys, "path", [*sys.path])  # MLflow puts the planted code directory first; undone after
    with pytest.raises(SystemExit, match="planted loader"):
        mlflow.pyfunc.load_model(str(model_dir))
    assert (model_dir / MARKER).exists()


LEGACY_ENTRY = (
    "from mlflow.models import set_model\n\n"
    "from anchorless.platform.models.pyfunc import DetectorPyfunc\n\n"
    "set_model(DetectorPyfunc())\n"
)  # the pyfunc_entry.py versions logged as models from code carry


def test_a_version_logged_as_models_from_code_is_refused_with_a_message_to_re_register(logged, registered, tmp_path):
    model_dir = _tampered(
        logged, tmp_path, "legacy",
        {"loader_module": "mlflow.pyfunc.model", "model_code_path": "pyfunc_entry.py", "data": None},
        {"pyfunc_entry.py": LEGACY_ENTRY},
    )  # fmt: skip
    with pytest.raises(ModelError, match='older anchorless as MLflow "models from code".*re-register it'):
        served_model(str(model_dir), format="torch", tracking_uri=registered.tracker.tracking_uri, workdir=tmp_path / "w")
    # Loaded by MLflow directly, its stored file runs (MLflow's doing) and stops at our module, saying the same.
    with pytest.raises(Exception, match=r"older anchorless as MLflow \"models from code\".*re-register it"):
        mlflow.pyfunc.load_model(str(model_dir))
    # Its weights still load where only the export is read (predict, evaluate, export).
    _, meta = load_model(str(model_dir))
    assert meta["image_size"] == 64
