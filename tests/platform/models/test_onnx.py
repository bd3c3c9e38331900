"""`anchorless export --format onnx|openvino`: one graph from image tensor to detections, equal to torch."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from anchorless.detectors import build_detector
from anchorless.detectors.layers import fold_batchnorm
from anchorless.platform.data.transforms import letterbox_images
from anchorless.platform.models.export import ModelError
from anchorless.platform.models.onnx import (
    DetectionGraph,
    check_batch,
    check_parity,
    export_onnx,
    read_onnx_metadata,
    torch_detections,
)
from anchorless.platform.models.onnx_runtime import onnxruntime_session, run_onnx, unmatched_detections
from tests.platform.models.conftest import MANIFEST

SIZE = 64
TINY = {
    "onenet": {"neck": {"channels": [32, 32, 32]}},
    "centernet": {"neck": {"channels": [32, 32, 32]}},
    "fcos": {"backbone": {"depth": 18}, "neck": {"out_channels": 32}, "head": {"num_convs": 1}},
    "onenet_fpn": {"backbone": {"depth": 18}, "neck": {"out_channels": 32}, "head": {"num_convs": 1}},
    # Its default Soft-NMS: a loop of topk picks unrolled in the graph (a few here: export time).
    "cornernet": {
        "backbone": {"depth": 18, "upsample_channels": [32, 32, 32]}, "head": {"channels": 32, "pool_channels": 32},
        "postprocess": {"topk": 6},
    },
}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = {"name": name, "num_classes": 3, **TINY[name]}
    model = build_detector({**config, "postprocess": {**config.get("postprocess", {}), "score_threshold": 0.0}})
    with torch.no_grad():  # off the initial values, so the scores spread out
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return fold_batchnorm(model.eval())


def _meta(model: torch.nn.Module) -> dict:
    config = {"detector": model.config, "data": {"image_size": SIZE}}
    return {"config": config, "categories": MANIFEST["categories"], "image_size": SIZE, "manifest_sha256": "ab" * 32}


def _images(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in ((48, 80), (70, 40), (64, 64))]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """name -> (tiny model, its exported graph), each exported once (an export takes seconds)."""
    cache: dict[str, tuple[torch.nn.Module, Path]] = {}

    def graph(name: str) -> tuple[torch.nn.Module, Path]:
        if name not in cache:
            model = _model(name)
            cache[name] = model, export_onnx(model, _meta(model), tmp_path_factory.mktemp(name), _images(0)[:2])
        return cache[name]

    return graph


@pytest.mark.parametrize("name", ["onenet", "centernet", "fcos", "onenet_fpn", "cornernet"])
def test_the_graph_runs_in_onnxruntime_like_torch_with_any_batch_and_carries_its_meta(name, graphs):
    model, path = graphs(name)

    meta = read_onnx_metadata(path)
    assert meta["categories"] == MANIFEST["categories"] and meta["image_size"] == SIZE and meta["detector"] == name
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert ("NonMaxSuppression" in ops) == (name == "fcos")  # NMS only where the detector has it on

    batch, _ = letterbox_images(_images(1), SIZE)  # three images: another batch size than exported with
    got = run_onnx(onnxruntime_session(path), batch.float().numpy())
    expected = model.predict(batch.float() / 255.0)  # the eager path every other caller uses
    k = model.postprocess.topk
    assert got["boxes"].shape == (3, k, 4) and got["scores"].shape == (3, k) and got["labels"].shape == (3, k)
    for image, want in enumerate(expected):
        scored = int((want["scores"] > 1e-3).sum())  # a heatmap's empty cells (score 0) are padding in the graph
        assert scored > 0
        want = {key: value.numpy() for key, value in want.items()}
        assert unmatched_detections({key: value[image] for key, value in got.items()}, want, image_side=SIZE) == 0
        assert (got["scores"][image, len(want["scores"]):] == 0).all()  # padding beyond torch's detections


def test_a_graph_that_disagrees_with_torch_is_refused(graphs):
    _, path = graphs("onenet")
    other = _model("onenet")
    with torch.no_grad():
        other.head.cls_score.bias.add_(1.0)  # the same network with other scores
    batch, _ = letterbox_images(_images(2)[:1], SIZE)
    with pytest.raises(ModelError, match="onnxruntime and torch disagree on check image 0"):
        check_parity(DetectionGraph(other), path.read_bytes(), batch.float())


def test_openvino_converts_the_nms_graph_and_a_conversion_that_disagrees_with_torch_is_not_written(graphs, tmp_path):
    import openvino

    from anchorless.platform.models.openvino import compile_cpu, export_openvino, read_openvino_metadata, run_openvino

    model, onnx_path = graphs("fcos")  # FCOS: NonMaxSuppression, the op most likely to convert badly
    batch = check_batch(_images(0)[:2], SIZE)
    reference = torch_detections(DetectionGraph(model), batch)
    wrong = {**reference, "scores": reference["scores"] * 0.5}
    with pytest.raises(ModelError, match="OpenVINO and torch disagree on check image 0"):
        export_openvino(onnx_path, _meta(model), tmp_path, batch.numpy(), wrong)
    assert not (tmp_path / "model.xml").exists() and not (tmp_path / "model.bin").exists()

    path = export_openvino(onnx_path, _meta(model), tmp_path, batch.numpy(), reference)
    assert path == tmp_path / "model.xml" and (tmp_path / "model.bin").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    meta = read_openvino_metadata(openvino.Core().read_model(str(path)))
    assert meta["categories"] == MANIFEST["categories"] and meta["image_size"] == SIZE and meta["detector"] == "fcos"
    other = check_batch(_images(1), SIZE)  # three images: another batch size than checked with
    got, want = run_openvino(compile_cpu(path), other.numpy()), torch_detections(DetectionGraph(model), other)
    for image in range(3):
        one = lambda d: {key: value[image] for key, value in d.items()}  # noqa: E731
        assert (want["scores"][image] > 0).sum() > 0
        assert unmatched_detections(one(got), one(want), image_side=SIZE) == 0


@pytest.mark.slow
def test_export_of_a_registered_version_adds_the_graph_and_the_ir_beside_its_pyfunc(registered, exported, capsys):
    from mlflow import MlflowClient

    from anchorless.jobs.cli import main

    assert exported.summary["registered"] == "shapes/1"
    assert {path.name for path in exported.out.iterdir()} == {"model.onnx", "model.xml", "model.bin"}
    uri = registered.tracker.tracking_uri
    client = MlflowClient(uri)
    version = client.get_model_version("shapes", "1")
    assert version.tags["anchorless.formats"] == "onnx,openvino,pyfunc"
    model_id = version.model_id or version.source.removeprefix("models:/")
    assert "model.onnx" in {item.path for item in client.list_logged_model_artifacts(model_id)}
    assert {item.path for item in client.list_logged_model_artifacts(model_id, "openvino")} == {
        "openvino/model.xml", "openvino/model.bin"
    }
    assert main(["models", "list", "shapes", "--tracking-uri", uri]) == 0
    assert "onnx,openvino,pyfunc" in capsys.readouterr().out
