"""How cost grows with the data and the cluster: sharding, a COCO-2017-sized ingest, streaming to 1-3 nodes.

Three rows of figures, each measured in a fresh process (peak memory is the sum of the
resident memory of that process and its children, sampled every 50 ms):

1. Sharding (``write_shards``, one writer per CPU, 64 MiB shards) of synthetic COCO sets of
   1k, 10k and 50k images: 640x480 JPEGs (a pool of distinct pictures, hard-linked so
   the disk holds each once; every file is still read and decoded), COCO's mean of 7
   boxes per image. Images/s, seconds per image, peak memory.
2. Ingest (``load_coco``) of a COCO-2017-sized instances JSON: 118,287 images and
   860,001 boxes, each with a polygon ``segmentation`` like COCO's (generated; the images
   are not needed for this row). Seconds and peak memory.
3. Streaming to Ray Train: a local multi-node cluster (``ray.cluster_utils.Cluster``, as
   the multi-node test runs it) of a head without CPUs and 1, 2, 3 nodes of the same
   CPUs each, one Ray Train worker per node reading its split of the training pipeline
   (``build_dataset(train=True)``: read, decode, augment to 512 px) with no model, from
   shards on local disk and on an S3 server (moto, loopback). Images/s per node and in
   total, timed over each worker's whole loop. The shards are not cached in the object
   store (``data.cache_encoded=never``), as for a COCO-sized split, so every pass reads them.

    python bench/scale.py [--sizes 1000,10000,50000] [--shard-mb 64] [--nodes 3] [--cpus-per-node 2]
                          [--stream-images 1000] [--stream-passes 1] [--parts shard,ingest,stream]

Prints a table per row, then one JSON line with every figure, including
``shard_cost_ratio_50k_vs_1k``, ``coco2017_ingest_s``, ``coco2017_ingest_peak_gib`` and
``stream_3_nodes_vs_1`` (total images/s at the most nodes over one node, local disk).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
COCO2017_IMAGES, COCO2017_BOXES = 118_287, 860_001
BOXES_PER_IMAGE = 7.3  # COCO 2017 train: 860,001 / 118,287
WIDTH, HEIGHT = 640, 480
POOL = 48  # distinct JPEGs behind the hard links
GIB = 2**30


# --- data -------------------------------------------------------------------------------------


def _picture(rng: np.random.Generator) -> bytes:
    """A 640x480 JPEG with a textured background and a few shapes: COCO-like size on disk."""
    from io import BytesIO

    from PIL import Image, ImageDraw

    ramp = np.linspace(0, 1, HEIGHT)[:, None, None]
    pixels = rng.uniform(30, 220, 3) * (1 - ramp) + rng.uniform(30, 220, 3) * ramp
    pixels = np.broadcast_to(pixels, (HEIGHT, WIDTH, 3)) + rng.normal(0, 18, (HEIGHT, WIDTH, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x, y = rng.uniform(0, WIDTH - 60), rng.uniform(0, HEIGHT - 60)
        w, h = rng.uniform(20, 200, 2)
        draw.rectangle([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    buffer = BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _boxes(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` xywh boxes inside a 640x480 image."""
    w = rng.uniform(8, WIDTH / 2, count)
    h = rng.uniform(8, HEIGHT / 2, count)
    return np.stack([rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h), w, h], axis=1).round(2)


def make_image_set(root: Path, num_images: int, seed: int = 0) -> tuple[Path, Path]:
    """``num_images`` hard links to a pool of distinct JPEGs and their COCO JSON."""
    rng = np.random.default_rng(seed)
    pool_dir, images = root / "pool", root / "images"
    pool_dir.mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    pool = []
    for index in range(POOL):
        path = pool_dir / f"{index:02d}.jpg"
        if not path.exists():
            path.write_bytes(_picture(rng))
        pool.append(path)
    coco: dict[str, Any] = {"images": [], "annotations": [], "categories": [{"id": i, "name": f"class{i}"} for i in range(1, 81)]}
    for image_id in range(1, num_images + 1):
        name = f"{image_id:06d}.jpg"
        os.link(pool[image_id % POOL], images / name)
        coco["images"].append({"id": image_id, "file_name": name, "width": WIDTH, "height": HEIGHT})
        for x, y, w, h in _boxes(rng, rng.poisson(BOXES_PER_IMAGE)).tolist():
            coco["annotations"].append(
                {"id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": int(rng.integers(1, 81)),
                 "bbox": [x, y, w, h], "area": round(w * h, 2), "iscrowd": 0}
            )  # fmt: skip
    annotations = root / "instances.json"
    annotations.write_text(json.dumps(coco))
    return annotations, images


def make_coco2017_json(path: Path, seed: int = 0) -> int:
    """A COCO-2017-sized instances JSON (polygons included, as COCO's); returns its size in bytes."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(COCO2017_BOXES - COCO2017_IMAGES, np.full(COCO2017_IMAGES, 1 / COCO2017_IMAGES)) + 1
    with open(path, "w") as out:
        out.write('{"info": {"description": "generated, COCO 2017 train sized"}, "licenses": [], "images": [')
        out.write(",".join(
            json.dumps({"id": i, "file_name": f"{i:012d}.jpg", "width": WIDTH, "height": HEIGHT, "license": 1})
            for i in range(1, COCO2017_IMAGES + 1)
        ))  # fmt: skip
        out.write('], "annotations": [')
        ann_id = 0
        for image_id, count in enumerate(counts.tolist(), start=1):
            for x, y, w, h in _boxes(rng, count).tolist():
                ann_id += 1
                polygon = np.column_stack([x + w * rng.uniform(0, 1, 12), y + h * rng.uniform(0, 1, 12)]).round(2).ravel()
                out.write(("," if ann_id > 1 else "") + json.dumps({
                    "id": ann_id, "image_id": image_id, "category_id": int(rng.integers(1, 81)), "iscrowd": 0,
                    "segmentation": [polygon.tolist()], "area": round(w * h * 0.6, 2), "bbox": [x, y, w, h],
                }))  # fmt: skip
        out.write('], "categories": ' + json.dumps([{"id": i, "name": f"class{i}", "supercategory": "x"} for i in range(1, 81)]) + "}")
    return path.stat().st_size


# --- measuring in a fresh process --------------------------------------------------------------


def measured(*child_args: str) -> dict[str, Any]:
    """Run this script as ``--child ...``; its JSON result plus ``peak_gib`` of its process tree."""
    import psutil

    process = subprocess.Popen([sys.executable, __file__, "--child", *child_args], stdout=subprocess.PIPE, text=True)
    parent, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out = process.stdout.read()
    if process.returncode != 0:
        sys.exit(f"child {' '.join(child_args)} failed with code {process.returncode}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_gib": peak / GIB}


def child(args: list[str]) -> None:
    """The measured work itself: imports first, then the timed call; prints one JSON line."""
    kind, *rest = args
    if kind == "shard":
        from anchorless.platform.data.shards import write_shards

        annotations, images, out, shard_mb = rest
        started = time.perf_counter()
        manifest = write_shards(annotations, images, out, target_shard_mb=float(shard_mb), progress=False)
        print(json.dumps({"seconds": time.perf_counter() - started, "images": manifest["num_images"],
                          "shards": len(manifest["shards"]), "bytes": sum(s["bytes"] for s in manifest["shards"])}))  # fmt: skip
    elif kind == "ingest":
        from anchorless.platform.data.coco import load_coco

        annotations, images = rest
        started = time.perf_counter()
        dataset = load_coco(annotations, images)
        print(json.dumps({"seconds": time.perf_counter() - started, "images": len(dataset.images) + len(dataset.bad_images),
                          "boxes": dataset.num_boxes + sum(b.num_boxes for b in dataset.bad_images)}))  # fmt: skip


# --- streaming ------------------------------------------------------------------------------------


def _stream_loop(config: dict[str, Any]) -> None:
    """A Ray Train worker that only reads: images of its split per second, from its first batch."""
    import ray.train

    context = ray.train.get_context()
    shard = ray.train.get_dataset_shard("train")
    images, started = 0, time.perf_counter()  # each pass's start-up (a new Ray Data execution) counts
    for _ in range(config["passes"]):
        for batch in shard.iter_batches(batch_size=config["batch_size"], batch_format="numpy", drop_last=True):
            images += len(batch["image"])
    seconds = time.perf_counter() - started
    record = {"rank": context.get_world_rank(), "node": ray.get_runtime_context().get_node_id(), "images": images, "seconds": seconds}
    Path(config["out_dir"], f"rank{record['rank']}.json").write_text(json.dumps(record))
    ray.train.report({"images": images})


def stream_once(address: str, shard_dir: str, workers: int, passes: int, out_dir: Path) -> dict[str, Any]:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from anchorless.platform.config import DataConfig
    from anchorless.platform.data.pipeline import build_dataset

    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        data = DataConfig(image_size=512, batch_size=8, cache_encoded="never")
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        trainer = TorchTrainer(
            _stream_loop,
            train_loop_config={"passes": passes, "batch_size": data.batch_size, "out_dir": str(out_dir)},
            scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}, placement_strategy="STRICT_SPREAD"),
            run_config=ray.train.RunConfig(storage_path=str(out_dir / "ray"), name="stream"),
            datasets={"train": build_dataset(shard_dir, data, train=True, seed=0)},
        )
        trainer.fit()
    finally:
        ray.shutdown()
    ranks = [json.loads(path.read_text()) for path in sorted(out_dir.glob("rank*.json"))]
    total = sum(r["images"] for r in ranks) / max(r["seconds"] for r in ranks)
    return {"workers": workers, "nodes": len({r["node"] for r in ranks}), "total": total, "per_node": total / workers}


def stream_rows(shards: dict[str, str], max_nodes: int, cpus_per_node: int, passes: int, root: Path) -> list[dict[str, Any]]:
    """Add a node at a time; at each size stream from every source. The head has no CPUs."""
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="anl-scale-"))  # short: socket paths
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    rows = []
    try:
        for nodes in range(1, max_nodes + 1):
            cluster.add_node(num_cpus=cpus_per_node, object_store_memory=400 * 2**20)
            cluster.wait_for_nodes()
            for source, shard_dir in shards.items():
                row = stream_once(cluster.address, shard_dir, nodes, passes, root / f"stream-{source}-{nodes}")
                rows.append({"source": source, **row})
                print(f"  {nodes} node(s), {source:<5}: {row['total']:7.1f} images/s in total, "
                      f"{row['per_node']:6.1f} per node (workers on {row['nodes']} node(s))", flush=True)  # fmt: skip
    finally:
        cluster.shutdown()
    return rows


def start_object_store() -> Any:
    """A loopback S3 server (moto) for this process and the cluster it starts; its variables set."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    import boto3

    boto3.client("s3").create_bucket(Bucket="scale")
    return server


# --- main ----------------------------------------------------------------------------------------


def _count(images: int) -> str:
    return f"{images // 1000}k" if images % 1000 == 0 else str(images)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,50000", help="image counts of the sharding row (default 1000,10000,50000)")
    parser.add_argument("--shard-mb", type=float, default=64.0, help="target shard size (default 64: even 1k images make two shards, one per writer here)")
    parser.add_argument("--nodes", type=int, default=3, help="stream to 1..N nodes (default 3)")
    parser.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs of each node: its worker's and a decode task's (default 2)")
    parser.add_argument("--stream-images", type=int, default=1000, help="images of the streamed split (default 1000)")
    parser.add_argument("--stream-passes", type=int, default=1, help="passes each streaming run reads (default 1)")
    parser.add_argument("--parts", default="shard,ingest,stream", help="which rows to measure (default all three)")
    parser.add_argument("--work-dir", default=None, help="scratch directory (default a new temp dir, removed at the end)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    parts = set(args.parts.split(","))
    root = Path(args.work_dir or tempfile.mkdtemp(prefix="anchorless-bench-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"benchmark": "scale", "cpus": os.cpu_count()}
    print(f"scratch {root}; {os.cpu_count()} CPUs", flush=True)
    try:
        if "shard" in parts:
            sizes = [int(size) for size in args.sizes.split(",")]
            print(f"sharding synthetic COCO sets ({WIDTH}x{HEIGHT} JPEG, ~{BOXES_PER_IMAGE} boxes/image)", flush=True)
            rows = []
            for size in sizes:
                work = root / f"set-{size}"
                annotations, images = make_image_set(work, size)
                row = measured("shard", str(annotations), str(images), str(work / "shards"), str(args.shard_mb))
                row["ms_per_image"] = 1000 * row["seconds"] / size
                rows.append({"images": size, **row})
                print(f"  {size:>6} images: {size / row['seconds']:7.1f} images/s, {row['ms_per_image']:.2f} ms/image, "
                      f"peak {row['peak_gib']:.2f} GiB, {row['shards']} shard(s) of {row['bytes'] / size / 1024:.0f} KiB/image", flush=True)  # fmt: skip
                if size != args.stream_images:
                    shutil.rmtree(work)
            result["shard"] = [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in rows]
            if len(rows) > 1:
                result[f"shard_cost_ratio_{_count(sizes[-1])}_vs_{_count(sizes[0])}"] = round(rows[-1]["ms_per_image"] / rows[0]["ms_per_image"], 3)
        if "ingest" in parts:
            print(f"ingest of a COCO-2017-sized JSON ({COCO2017_IMAGES} images, {COCO2017_BOXES} boxes)", flush=True)
            path = root / "instances_coco2017_sized.json"
            size = make_coco2017_json(path)
            (root / "no-images").mkdir(exist_ok=True)
            row = measured("ingest", str(path), str(root / "no-images"))
            print(f"  {size / 2**20:.0f} MiB JSON: {row['seconds']:.1f} s, peak {row['peak_gib']:.2f} GiB", flush=True)
            result.update(coco2017_json_mib=round(size / 2**20, 1), coco2017_ingest_s=round(row["seconds"], 2),
                          coco2017_ingest_peak_gib=round(row["peak_gib"], 3))  # fmt: skip
            path.unlink()
        if "stream" in parts:
            print(f"streaming {args.stream_images} images x {args.stream_passes} passes to 1..{args.nodes} node(s) "
                  f"of {args.cpus_per_node} CPUs, one Ray Train worker each", flush=True)  # fmt: skip
            work = root / f"set-{args.stream_images}"
            if not (work / "shards").is_dir():
                annotations, images = make_image_set(work, args.stream_images)
                measured("shard", str(annotations), str(images), str(work / "shards"), str(args.shard_mb))
            server = start_object_store()
            try:
                from anchorless.platform.data.shards import write_shards

                write_shards(work / "instances.json", work / "images", "s3://scale/train", progress=False)
                rows = stream_rows({"local": str(work / "shards"), "s3": "s3://scale/train"}, args.nodes, args.cpus_per_node, args.stream_passes, root)
            finally:
                server.stop()
            result["stream"] = [{k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()} for row in rows]
            for source in ("local", "s3"):
                totals = {row["workers"]: row["total"] for row in rows if row["source"] == source}
                if 1 in totals and len(totals) > 1:
                    key = f"stream_{max(totals)}_nodes_vs_1" + ("" if source == "local" else "_s3")
                    result[key] = round(totals[max(totals)] / totals[1], 3)
    finally:
        if args.work_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
