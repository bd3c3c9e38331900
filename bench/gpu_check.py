"""The GPU check: every registered detector trains and predicts on the device, fast enough.

CPU CI never runs the GPU code paths, so this is the check a machine with a GPU runs.
It is pure PyTorch (the detectors and torchvision; no Ray, DeepSpeed or MLflow) so it
runs on a bare machine with torch and torchvision alone. For each detector it:

1. builds it with random weights and trains ``--steps`` AdamW steps in bf16 autocast
   (the platform's mixed precision on GPUs) on one fixed batch of random images and boxes,
   and checks the loss falls (the mean of the last quarter of the steps below the first
   quarter's: a model that cannot fit one batch is broken on the device)
   and that every parameter, gradient and output is on the device;
2. measures training images/s, and inference images/s (``predict``: forward plus
   decoding, BatchNorm folded as served models are) at each ``--infer-batches`` size;

torchvision's ``fcos_resnet50_fpn`` (random weights) is measured beside them, the same
way, as the peer. Prints a table, then one JSON line of the figures.

    python bench/gpu_check.py                          # on CUDA, 512 px, 20 steps
    python bench/gpu_check.py --device cpu --steps 8 --image-size 96 --train-batch 2 --infer-batches 1,2

Exits non-zero when a detector's loss does not fall, something lands on the wrong device,
or a loss is not finite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from torchvision.models.detection import fcos_resnet50_fpn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anchorless.detectors import DETECTORS, build_detector  # noqa: E402
from anchorless.detectors.layers import fold_batchnorm  # noqa: E402

NUM_CLASSES = 3
PEER = "torchvision_fcos_r50"
# The keypoint detectors default to Hourglass-104 (190M parameters, minutes a step on a shared
# CPU): the CPU smoke run checks the same heads, losses and decoding on the ResNet-18 trunk.
# CornerNet-Lite keeps its own hourglasses there, narrower (Saccade's is 117M parameters).
KEYPOINT_ON_CPU = {"backbone": {"depth": 18}, "head": {"channels": 64}}
CPU_SETTINGS = {
    "cornernet": KEYPOINT_ON_CPU,
    "centernet_triplets": KEYPOINT_ON_CPU,
    "cornernet_squeeze": {"backbone": {"channels": [64, 64, 96, 96, 128], "out_channels": 64}, "head": {"channels": 64}},
    "cornernet_saccade": {
        "backbone": {"channels": [64, 96, 96, 128], "out_channels": 64},
        "head": {"channels": 64, "attention_channels": 64},
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--steps", type=int, default=20, help="training steps per detector")
    parser.add_argument("--image-size", type=int, default=512, help="square input size, a multiple of 32")
    parser.add_argument("--train-batch", type=int, default=8, help="images per training step")
    parser.add_argument("--infer-batches", default="1,16", help="comma-separated inference batch sizes")
    parser.add_argument("--repeats", type=int, default=10, help="timed inference calls per batch size")
    parser.add_argument("--only", nargs="*", help="detector names to check (default: every registered one)")
    parser.add_argument("--no-peer", action="store_true", help="skip torchvision's FCOS-R50")
    return parser.parse_args(argv)


def random_batch(batch: int, size: int, device: torch.device, seed: int = 0):
    """Random images in [0, 1] and 1-4 random boxes (at least 1/8 of the side) per image."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=generator)
    targets = []
    for _ in range(batch):
        count = int(torch.randint(1, 5, (1,), generator=generator))
        corner = torch.rand(count, 2, generator=generator) * size * 0.6  # (N, 2)
        extent = (torch.rand(count, 2, generator=generator) * 0.3 + 0.125) * size  # (N, 2)
        boxes = torch.cat([corner, (corner + extent).clamp(max=size - 1)], dim=1)  # (N, 4) xyxy
        labels = torch.randint(0, NUM_CLASSES, (count,), generator=generator)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images.to(device), targets


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # bf16 autocast as the platform trains on GPUs; on a CPU only when asked for (slow without AMX).
    return torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wrong_device(tensors, device: torch.device) -> list[str]:
    return [name for name, tensor in tensors if tensor is not None and tensor.device.type != device.type]


def train_check(model: torch.nn.Module, device: torch.device, args: argparse.Namespace, *, peer: bool) -> dict:
    """Train on one fixed batch; (first loss, last loss, images/s after the first step, problems)."""
    images, targets = random_batch(args.train_batch, args.image_size, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    losses, problems = [], []
    started = None
    for step in range(args.steps):
        if step == 1:  # the first step pays for cuDNN's algorithm search and allocations
            synchronize(device)
            started = time.perf_counter()
        with autocast(device):
            out = model(list(images), targets) if peer else model(images, targets)
        loss = sum(out.values()) if peer else out["loss"]
        if not torch.isfinite(loss):
            problems.append(f"non-finite loss at step {step + 1}")
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    synchronize(device)
    seconds = time.perf_counter() - started if started is not None else float("nan")
    problems += [f"parameter {name} off the device" for name in wrong_device(model.named_parameters(), device)]
    grads = ((name, p.grad) for name, p in model.named_parameters())
    problems += [f"gradient of {name} off the device" for name in wrong_device(grads, device)]
    # Early steps are noisy (a one-to-one matching moves, BatchNorm sees a small batch):
    # compare the mean of the last quarter of the steps with that of the first.
    quarter = max(1, len(losses) // 4)
    first, last = (sum(part) / quarter for part in (losses[:quarter], losses[-quarter:]))
    if len(losses) == args.steps >= 4 and not last < first:
        problems.append(f"loss did not fall: {first:.4f} -> {last:.4f} (means of the first and last {quarter} steps)")
    return {
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "train_images_per_s": (args.steps - 1) * args.train_batch / seconds if args.steps > 1 else None,
        "problems": problems,
    }


@torch.no_grad()
def infer_check(model: torch.nn.Module, device: torch.device, args: argparse.Namespace, *, peer: bool) -> dict:
    """Inference images/s per batch size, and that the detections come back on the device."""
    model.eval()
    figures, problems = {}, []
    for batch in (int(b) for b in args.infer_batches.split(",")):
        images = torch.rand(batch, 3, args.image_size, args.image_size, device=device)
        run = (lambda: model(list(images))) if peer else (lambda: model.predict(images))
        with autocast(device):
            detections = run()  # warm-up
        problems += [f"detection {key} off the device" for key, _ in wrong_device(
            ((key, value) for det in detections for key, value in det.items()), device)]
        synchronize(device)
        started = time.perf_counter()
        for _ in range(args.repeats):
            with autocast(device):
                run()
        synchronize(device)
        figures[f"infer_b{batch}_images_per_s"] = batch * args.repeats / (time.perf_counter() - started)
    return {**figures, "problems": problems}


def build(name: str, size: int, device: torch.device) -> tuple[torch.nn.Module, bool]:
    if name == PEER:
        model = fcos_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=size, max_size=size
        )
        return model.to(device), True
    torch.manual_seed(0)
    cfg = {"name": name, "num_classes": NUM_CLASSES, **(CPU_SETTINGS.get(name, {}) if device.type == "cpu" else {})}
    return build_detector(cfg).to(device), False


def check(name: str, device: torch.device, args: argparse.Namespace) -> dict:
    model, peer = build(name, args.image_size, device)
    row = train_check(model, device, args, peer=peer)
    served = model if peer else fold_batchnorm(model.eval())  # served models are folded
    inference = infer_check(served, device, args, peer=peer)
    row["problems"] = row["problems"] + inference.pop("problems")
    return {**row, **inference}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; run with --device cpu for the CPU smoke check", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    names = list(args.only or DETECTORS) + ([] if args.no_peer else [PEER])
    rows = {name: check(name, device, args) for name in names}

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    batches = [f"infer_b{int(b)}_images_per_s" for b in args.infer_batches.split(",")]
    header = ["detector", "loss first", "loss last", "train img/s", *[f"infer b{b.split('_')[1][1:]} img/s" for b in batches], "ok"]
    print(f"GPU check on {device_name}, {args.image_size} px, {args.steps} steps of {args.train_batch} images")
    print(" | ".join(header))
    for name, row in rows.items():
        cells = [name, _fmt(row["loss_first"]), _fmt(row["loss_last"]), _fmt(row["train_images_per_s"], 1)]
        cells += [_fmt(row.get(key), 1) for key in batches]
        cells.append("yes" if not row["problems"] else "; ".join(row["problems"]))
        print(" | ".join(cells))
    if PEER in rows:
        for key in batches:
            for name in rows:
                if name != PEER and rows[name].get(key) and rows[PEER].get(key):
                    rows[name][f"{key.removesuffix('_images_per_s')}_vs_peer"] = rows[name][key] / rows[PEER][key]
    failed = {name: row["problems"] for name, row in rows.items() if row["problems"]}
    print(json.dumps({"device": device_name, "image_size": args.image_size, "steps": args.steps,
                      "detectors": rows, "failed": failed}))  # fmt: skip
    return 1 if failed else 0


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
