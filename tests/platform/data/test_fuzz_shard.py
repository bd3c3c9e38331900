"""`anchorless data shard` on hypothesis-generated COCO JSON: wrong types, missing keys, boxes
outside the image, NaN, huge values, unicode names, duplicate ids. Every case must end in a
shard directory that verifies, or in exit code 2 with one clear error naming the file; never a
traceback, never a partial output."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from anchorless.jobs.cli import main
from anchorless.platform.data.shards import read_manifest

WIDTH, HEIGHT = 16, 12
ON_DISK = ["img_0.png", "img_1.png", "img_2.png"]
ACCENTED = unicodedata.normalize("NFC", "\u00e9t\u00e9.png")  # stored on disk decomposed (NFD)
FILE_NAMES = ON_DISK + [ACCENTED, "missing.png", "../img_0.png", "/etc/passwd", "sub/../img_1.png", "\ud800.png", "a\x00.png"]
EXAMPLES = 120

# Values of the wrong type or out of every range, for any field.
weird = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(-3, 40), max_size=5),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
small_id = st.integers(min_value=1, max_value=4)  # few values: duplicates are common
an_id = st.one_of(small_id, small_id, small_id, weird)
coordinate = st.one_of(st.integers(-20, 40), st.floats(-20, 40), st.floats(allow_nan=True, allow_infinity=True), st.floats(-1e300, 1e300))
bbox = st.one_of(st.lists(coordinate, min_size=4, max_size=4), st.lists(coordinate, min_size=4, max_size=4), weird)
name = st.one_of(st.sampled_from(["cell", "\u00e9t\u00e9", "\u732b", "\U0001f600", "x\udfff"]), st.text(max_size=8))


def _entry(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """A record with each field drawn, some keys left out, or (rarely) not an object at all."""

    @st.composite
    def build(draw) -> Any:
        entry = {key: draw(strategy) for key, strategy in fields.items()}
        for key in draw(st.sets(st.sampled_from(sorted(fields)), max_size=2)):
            entry.pop(key)
        return entry

    return st.one_of(build(), build(), build(), build(), weird)


image = _entry({
    "id": an_id,
    "file_name": st.one_of(st.sampled_from(FILE_NAMES), st.sampled_from(ON_DISK), st.text(max_size=10)),
    "width": st.one_of(st.just(WIDTH), st.just(WIDTH), weird),
    "height": st.one_of(st.just(HEIGHT), st.just(HEIGHT), weird),
})  # fmt: skip
annotation = _entry({
    "id": an_id,
    "image_id": an_id,
    "category_id": an_id,
    "bbox": bbox,
    "area": st.one_of(st.floats(0, 200), weird),
    "iscrowd": st.one_of(st.sampled_from([0, 1]), weird),
})  # fmt: skip
category = _entry({"id": an_id, "name": name})


@st.composite
def clean_documents(draw) -> dict[str, Any]:
    """A COCO file a shard run should take: real files and ids (huge ones too), boxes poking out
    of the image or empty (repaired and counted), huge areas, unicode category names."""
    file_names = draw(st.lists(st.sampled_from(ON_DISK + [ACCENTED]), min_size=1, max_size=4, unique=True))
    any_id = st.one_of(st.integers(1, 50), st.integers(2**63 - 5, 2**63 - 1), st.integers(-(2**63), -(2**63) + 5))
    image_ids = draw(st.lists(any_id, min_size=len(file_names), max_size=len(file_names), unique=True))
    category_ids = draw(st.lists(any_id, min_size=1, max_size=3, unique=True))
    names = st.one_of(st.sampled_from(["cell", "\u00e9t\u00e9", "\u732b", "\U0001f600"]), st.text(min_size=1, max_size=8))
    finite = st.one_of(st.integers(-20, 40), st.floats(-20, 40), st.floats(-1e300, 1e300))
    annotations = draw(st.lists(st.fixed_dictionaries({
        "image_id": st.sampled_from(image_ids),
        "category_id": st.sampled_from(category_ids),
        "bbox": st.lists(finite, min_size=4, max_size=4),
        "area": st.one_of(st.floats(0, 200), st.floats(0, 1e300)),
        "iscrowd": st.sampled_from([0, 1]),
    }), max_size=6))  # fmt: skip
    return {
        "images": [{"id": i, "file_name": f, "width": WIDTH, "height": HEIGHT} for i, f in zip(image_ids, file_names)],
        "annotations": [{"id": n + 1, **a} for n, a in enumerate(annotations)],
        "categories": [{"id": c, "name": draw(names)} for c in category_ids],
    }


@st.composite
def one_fault(draw) -> Any:
    """A clean file with one thing broken: a key dropped, a value replaced, an entry duplicated."""
    document = draw(clean_documents())
    section = draw(st.sampled_from(["images", "annotations", "categories"]))
    entries = document[section]
    if not entries or draw(st.integers(0, 9)) == 0:
        document[section] = draw(weird)
        return document
    entry = entries[draw(st.integers(0, len(entries) - 1))]
    what = draw(st.sampled_from(["drop", "replace", "replace", "duplicate", "not an object"]))
    key = draw(st.sampled_from(sorted(entry)))
    if what == "drop":
        entry.pop(key)
    elif what == "replace":
        entry[key] = draw(st.one_of(weird, st.sampled_from(FILE_NAMES), name))
    elif what == "duplicate":
        entries.append(dict(entry))
    else:
        entries[entries.index(entry)] = draw(weird)
    return document


@st.composite
def chaos(draw) -> Any:
    """Every field drawn from anything: wrong types, missing keys, NaN, huge values, or no object at all."""
    document = {
        "images": draw(st.lists(image, max_size=4)),
        "annotations": draw(st.lists(annotation, max_size=6)),
        "categories": draw(st.lists(category, max_size=3)),
    }
    for key in draw(st.sets(st.sampled_from(sorted(document)), max_size=1)):
        if draw(st.booleans()):
            document.pop(key)
        else:
            document[key] = draw(weird)
    return draw(st.one_of(st.just(document), st.just(document), weird))


coco_documents = st.one_of(clean_documents(), one_fault(), chaos())


def _image_root(root: Path) -> Path:
    images = root / "images"
    images.mkdir()
    for index, file_name in enumerate(ON_DISK + [unicodedata.normalize("NFD", ACCENTED)]):
        Image.new("RGB", (WIDTH, HEIGHT), (40 * index, 0, 0)).save(images / file_name, format="PNG")
    return images


def _problem(message: str) -> str:
    """The kind of refusal, for the tally: the problem with ids, values and paths taken out."""
    problem = message.split(": ")[-1] if "): " not in message else message.split("): ", 1)[1]
    problem = re.sub(r"'[^']*'|\"[^\"]*\"|\[.*\]|\{.*\}|-?\d[\d.,e+-]*|\(.*", "_", problem.splitlines()[0])
    return " ".join(problem.split())[:60]


def test_generated_coco_json_ends_in_shards_or_one_clear_error_never_a_traceback_or_partial_output(tmp_path) -> None:
    images = _image_root(tmp_path)
    outcomes: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    cases = iter(range(10**9))

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(coco_documents)
    def shard_one(document: Any) -> None:
        case = tmp_path / f"case{next(cases)}"
        case.mkdir()
        annotations, out = case / "instances.json", case / "out"
        annotations.write_text(json.dumps(document, allow_nan=True), encoding="utf-8", errors="surrogatepass")
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["data", "shard", "--annotations", str(annotations), "--images", str(images), "--out", str(out), "--workers", "1"])
        if code == 0:
            manifest = read_manifest(out, verify=True)  # every shard there, checksums matching
            assert manifest["num_images"] >= 1
            repaired = any(manifest[kind] for kind in ("dropped", "clipped", "corrected"))
            outcomes["sharded, boxes repaired and counted" if repaired else "sharded"] += 1
        else:
            assert code == 2 and "Traceback" not in stderr.getvalue(), (code, stderr.getvalue())
            errors = [line for line in stderr.getvalue().splitlines() if line.startswith("error: ")]  # beside the progress bar
            assert len(errors) == 1, stderr.getvalue()
            error = errors[0]
            assert str(annotations) in error or str(images) in error, error  # names the file
            assert sorted(os.listdir(case)) == ["instances.json"], os.listdir(case)  # nothing written, no temp dir
            outcomes["refused"] += 1
            problems[_problem(error[len("error: "):])] += 1
        shutil.rmtree(case)

    shard_one()
    print(f"\n{EXAMPLES} generated COCO files: " + ", ".join(f"{kind} {count}" for kind, count in outcomes.most_common()))
    for problem, count in problems.most_common():
        print(f"  refused {count:3d}: {problem}")
    assert sum(outcomes.values()) == EXAMPLES
    # The generator reaches both ends: documents good enough to shard and ones refused.
    assert outcomes["refused"] >= EXAMPLES // 4
    assert outcomes["sharded"] + outcomes["sharded, boxes repaired and counted"] >= EXAMPLES // 4, outcomes
