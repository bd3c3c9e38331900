import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18

import anchorless.detectors as detectors
from anchorless.detectors import DETECTORS, DetectorConfigError, build_detector, default_detector_config, register
from anchorless.detectors import registry
from anchorless.detectors.centernet import CenterNet
from anchorless.detectors.centernet_triplets import CenterNetTriplets
from anchorless.detectors.cornernet import CornerNet
from anchorless.detectors.cornernet_saccade import CornerNetSaccade
from anchorless.detectors.cornernet_squeeze import CornerNetSqueeze
from anchorless.detectors.fcos import FCOS
from anchorless.detectors.gfl import GFL, GFLV2
from anchorless.detectors.onenet import OneNet, OneNetFPN

from .conftest import small_config

PACKAGE = Path(detectors.__file__).parent


def test_registry_names_every_detector():
    assert DETECTORS == {
        "onenet": OneNet, "onenet_fpn": OneNetFPN, "centernet": CenterNet, "fcos": FCOS, "gfl": GFL, "gfl_v2": GFLV2,
        "cornernet": CornerNet, "centernet_triplets": CenterNetTriplets,
        "cornernet_squeeze": CornerNetSqueeze, "cornernet_saccade": CornerNetSaccade,
    }  # fmt: skip


def test_defaults_are_the_papers_values():
    onenet = default_detector_config("onenet")
    assert onenet["assigner"] == {
        "cost_cls": 2.0, "cost_l1": 5.0, "cost_giou": 2.0, "mode": "min", "focal_alpha": 0.25, "focal_gamma": 2.0, "center_radius": 0.0,
    }
    assert onenet["loss"] == {
        "cls": 2.0, "l1": 5.0, "giou": 2.0, "focal_alpha": 0.25, "focal_gamma": 2.0, "one_to_many": 1.0, "box_loss": "giou"
    }
    assert onenet["postprocess"] == {
        "topk": 100, "nms": False, "nms_iou": 0.6, "score_threshold": 0.0,
        "nms_sigma": None, "nms_beta": None, "nms_min_score": None,  # null: each NMS kind's paper value
    }
    assert onenet["head"] == {
        "prior_prob": 0.01, "num_heads": 1, "ltrb_init": 4.0, "ltrb_scale": 1.0, "one_to_many_topk": 0,  # no auxiliary head
        "one_to_many_shares_boxes": True,
    }

    centernet = default_detector_config("centernet")
    assert centernet["loss"] == {"heatmap": 1.0, "size": 0.1, "offset": 1.0, "alpha": 2.0, "beta": 4.0}
    assert centernet["assigner"] == {"min_overlap": 0.7, "radius_formula": "original", "min_radius": 0}

    fcos = default_detector_config("fcos")
    assert fcos["assigner"]["size_ranges"] == [-1.0, 64.0, 128.0, 256.0, 512.0, float("inf")]
    assert fcos["assigner"]["kind"] == "point"  # ATSS by config: kind atss, 9 per level, anchors of 8 strides
    assert (fcos["assigner"]["topk"], fcos["assigner"]["anchor_scale"]) == (9, 8.0)
    assert fcos["postprocess"] == {
        "topk": 100, "nms": True, "nms_iou": 0.6, "score_threshold": 0.05, "pre_nms_topk": 1000,
        "nms_sigma": None, "nms_beta": None, "nms_min_score": None,
    }
    assert fcos["backbone"]["depth"] == 50 and fcos["neck"] == {"out_channels": 256}

    gfl, gfl_v2 = default_detector_config("gfl"), default_detector_config("gfl_v2")
    assert gfl["loss"] == {"qfl": 1.0, "dfl": 0.25, "box": 2.0, "box_loss": "giou", "qfl_beta": 2.0}
    assert gfl["assigner"] == {"topk": 9, "anchor_scale": 8.0}
    assert gfl["head"] == {
        "num_convs": 4, "prior_prob": 0.01, "reg_max": 16, "version": "v1", "dgqp_topk": 4, "dgqp_channels": 64,
        "dist_bias_decay": 0.0,  # the official uniform start
    }
    assert gfl_v2["head"]["version"] == "v2" and {k: v for k, v in gfl_v2.items() if k not in ("name", "head")} == {
        k: v for k, v in gfl.items() if k not in ("name", "head")
    }
    assert gfl["postprocess"] == fcos["postprocess"]  # 0.05, top 1000 per level, NMS 0.6, 100


def test_every_weight_is_reachable_by_its_dotted_path():
    model = build_detector(small_config("onenet", assigner={"cost_giou": 3.5, "mode": "hungarian"}, loss={"l1": 4}))
    assert model.assigner.cost_giou == 3.5 and model.assigner.mode == "hungarian"
    assert model.loss.l1_loss.weight == 4.0
    assert model.config["assigner"]["cost_giou"] == 3.5
    assert model.config["loss"]["l1"] == 4.0 and isinstance(model.config["loss"]["l1"], float)


def test_resolved_config_builds_the_same_detector_again():
    model = build_detector(small_config("fcos", loss={"box_loss": "ciou"}))
    again = build_detector(model.config)
    assert again.config == model.config
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())


def test_a_component_that_hands_kwargs_to_its_parent_takes_the_parents_settings_at_its_own_defaults():
    from anchorless.detectors.postprocess.saccade import SaccadePostprocess

    settings = registry.config_parameters(SaccadePostprocess)  # Postprocess <- CornerPostprocess <- Saccade
    defaults = {name: default for name, (default, _) in settings.items()}
    assert {"topk", "nms", "nms_beta", "score_threshold", "peak_kernel", "corner_topk", "k_max"} <= set(defaults)
    assert (defaults["topk"], defaults["nms_beta"], defaults["peak_kernel"]) == (100, None, 3)  # inherited
    assert (defaults["nms"], defaults["nms_iou"]) == ("soft_gaussian", 0.5)  # CornerNet's, over Postprocess's
    assert (defaults["nms_sigma"], defaults["corner_topk"], defaults["k_max"]) == (0.7, 12, 30)  # Saccade's own
    post = {"topk": 7, "peak_kernel": 5, "nms_sigma": 0.4, "center_topk": 9}
    model = build_detector(small_config("centernet_triplets", postprocess=post, loss={"pull": 0.3}))
    assert (model.postprocess.topk, model.postprocess.peak_kernel, model.postprocess.center_topk) == (7, 5, 9)
    assert model.postprocess.nms_settings["sigma"] == 0.4 and model.postprocess.corner_topk == 70
    with pytest.raises(DetectorConfigError, match="detector.postprocess.k_max: unknown key"):
        build_detector(small_config("centernet_triplets", postprocess={"k_max": 3}))  # a sibling's, not a parent's


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"name": "onenet", "assigner": {"cost_gio": 2.0}},
         "detector.assigner.cost_gio: unknown key; expected one of center_radius, cost_cls, cost_giou, cost_l1, focal_alpha, focal_gamma, mode"),
        ({"name": "onenet", "assigner": {"cost_giou": "2"}}, "detector.assigner.cost_giou: expected float, got str '2'"),
        ({"name": "onenet", "assigner": {"mode": "fast"}}, "detector.assigner.mode: expected one of 'min', 'hungarian'"),
        ({"name": "onenet", "postprocess": {"nms": 1}}, "detector.postprocess.nms: expected bool or one of 'none', 'hard'"),
        ({"name": "onenet", "postprocess": {"nms": "greedy"}}, "detector.postprocess.nms: expected bool or one of 'none'"),
        ({"name": "fcos", "assigner": {"kind": "simota"}}, "detector.assigner.kind: expected one of 'point', 'atss'"),
        ({"name": "gfl", "loss": {"box_loss": "eiou"}}, "detector.loss.box_loss: expected one of 'iou', 'linear_iou'"),
        ({"name": "centernet", "backbone": {"depth": 101}}, "detector.backbone.depth: expected one of 18, 34, 50"),
        ({"name": "fcos", "head": {"num_convs": 2.5}}, "detector.head.num_convs: expected int, got float 2.5"),
        ({"name": "yolo"}, "detector.name: unknown detector 'yolo'; expected one of centernet, centernet_triplets, cornernet, cornernet_saccade, cornernet_squeeze, fcos"),
        ({"name": "cornernet", "backbone": {"depth": 101}}, "detector.backbone.depth: expected one of 18, 34, 50, 52, 104"),
        ({"name": "cornernet", "backbone": {"depth": 18, "stacks": 2}},
         "detector.backbone: stacks, channels and blocks apply to the hourglass depths (52, 104) only"),
        ({"name": "cornernet", "backbone": {"depth": 18}, "postprocess": {"corner_topk": 0}},
         "detector.postprocess: corner_topk must be >= 1"),
        ({"name": "centernet_triplets", "backbone": {"depth": 18}, "postprocess": {"small_n": 0}},
         "detector.postprocess: small_n and large_n"),
        ({"name": "centernet_triplets", "loss": {"pul": 0.1}}, "detector.loss.pul: unknown key; expected one of alpha"),
        ({"num_classes": 3}, "detector.name: missing"),
        ({"name": "onenet", "num_classes": 0}, "detector.num_classes: expected a positive int"),
        ({"name": "onenet", "optimizer": {}}, "detector.optimizer: unknown key"),
        ({"name": "onenet", "loss": [1, 2]}, "detector.loss: expected a mapping"),
        ({"name": "fcos", "assigner": {"size_ranges": [-1, 64, 1e8]}}, "detector.assigner.size_ranges: 3 entries"),
        ({"name": "onenet", "head": {"num_heads": 0}}, "detector.head: num_heads must be >= 1"),
    ],
)
def test_bad_configs_raise_a_config_error_naming_the_dotted_key(cfg, message):
    with pytest.raises(DetectorConfigError) as error:
        build_detector(cfg)
    assert str(error.value).startswith(message)
    assert isinstance(error.value, ValueError)


def test_pretrained_backbone_loads_from_a_local_file_and_a_missing_file_is_a_config_error(tmp_path):
    reference = resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    model = build_detector(small_config("centernet", backbone={"pretrained": str(path)}))
    assert torch.equal(model.backbone.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    assert torch.equal(model.backbone.stem[1].running_var, reference.bn1.running_var)
    with pytest.raises(DetectorConfigError, match="detector.backbone: pretrained: no such file"):
        build_detector(small_config("centernet", backbone={"pretrained": str(tmp_path / "missing.pth")}))


def test_pretrained_file_of_another_depth_is_rejected(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    with pytest.raises(DetectorConfigError, match="does not fit this backbone"):
        build_detector({"name": "fcos", "backbone": {"depth": 34, "pretrained": str(path)}})


def test_frozen_stages_and_frozen_bn_take_effect():
    model = build_detector({"name": "fcos", "num_classes": 3, "backbone": {"depth": 18, "frozen_stages": 2}})
    assert not any(p.requires_grad for p in model.backbone.stem.parameters())
    assert not any(p.requires_grad for p in model.backbone.layer1.parameters())
    assert all(p.requires_grad for p in model.backbone.layer2.parameters())
    assert type(model.backbone.layer2[0].bn1).__name__ == "FrozenBatchNorm2d"


def test_the_package_never_imports_ray_deepspeed_or_mlflow():
    sources = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))  # the sub-packages too
    for name in ("ray", "deepspeed", "mlflow"):
        assert f"import {name}" not in sources and f"from {name}" not in sources
    code = (  # every module of the package, imported
        "import sys, importlib, pkgutil, anchorless.detectors as d;"
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(d.__path__, 'anchorless.detectors.')];"
        "bad = [m for m in ('ray', 'deepspeed', 'mlflow') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- @register


@pytest.fixture
def scratch_registry():
    """Whatever a test registers is gone after it."""
    before = dict(DETECTORS)
    yield
    registry._REGISTERED.clear()
    registry._REGISTERED.update(before)


def test_register_decorator_makes_a_new_detector_buildable_by_its_name(scratch_registry):
    @register("onenet_r18")
    class OneNetR18(OneNet):
        defaults = {"backbone": {"depth": 18, "norm": "bn"}}

    assert DETECTORS["onenet_r18"] is OneNetR18
    assert default_detector_config("onenet_r18")["backbone"]["depth"] == 18
    model = build_detector({"name": "onenet_r18", "num_classes": 2})
    assert type(model) is OneNetR18 and model.config["name"] == "onenet_r18"


def test_registering_a_second_class_under_a_taken_name_is_refused(scratch_registry):
    with pytest.raises(ValueError, match=r"detector name 'fcos' is already registered to anchorless\.detectors\.fcos\.FCOS"):

        @register("fcos")
        class OtherFCOS(FCOS):
            pass

    assert DETECTORS["fcos"] is FCOS
    assert register("fcos")(FCOS) is FCOS  # the same class again changes nothing


def test_register_refuses_a_class_without_a_component_for_every_section(scratch_registry):
    with pytest.raises(TypeError, match="components lacks postprocess"):

        @register("no_postprocess")
        class NoPostprocess(CenterNet):
            components = {k: v for k, v in CenterNet.components.items() if k != "postprocess"}

    assert "no_postprocess" not in DETECTORS


def test_the_registry_is_read_only_from_outside():
    with pytest.raises(TypeError):
        DETECTORS["mine"] = OneNet  # type: ignore[index]
