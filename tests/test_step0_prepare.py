"""Step 0 on the bundled sample, on the 1500 shared images when present, and on every kind of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_ROOT, SHARED_NEU_DET, SMOKE_CONFIG
from PIL import Image

from neu_det_pipeline.config import NEU_DET_CLASSES, load_config
from neu_det_pipeline.data.export import box_pixel_bounds, boxes_from_yolo
from neu_det_pipeline.data.neu_det import Box, class_from_stem
from neu_det_pipeline.io import read_json, read_jsonl
from neu_det_pipeline.recipe import run_step
from neu_det_pipeline.step0_prepare import STEP
from neu_det_pipeline.yolo import check_yolo_dataset

# Files that name the run folder or hold timings; everything else must be byte-identical across runs.
RUN_SPECIFIC = {"summary.json", "config.yaml", "state.json"}


def prepare(root: Path, out: Path, *overrides: str) -> dict:
    config = load_config(SMOKE_CONFIG, [f"data.root={root}", f"run.output_dir={out}", "run.tiny_models_dir=null", *overrides])
    return run_step(STEP, config)


def xml_boxes(path: Path) -> list[Box]:
    boxes = []
    for obj in ET.parse(path).findall("object"):
        b = obj.find("bndbox")
        boxes.append(Box(obj.findtext("name"), *(float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))))
    return boxes


def check_outputs(root: Path, step_dir: Path, classes: list[str]) -> list[dict]:
    """Masks match boxes, YOLO labels round-trip to the XML boxes, copies are 3 identical channels."""
    rows = read_jsonl(step_dir / "manifest.jsonl")
    for row in rows:
        mask = np.asarray(Image.open(step_dir / row["mask"]))
        expected = np.zeros((row["height"], row["width"]), dtype=np.uint8)
        for box in row["boxes"]:
            x0, y0, x1, y1 = box_pixel_bounds(Box(**box))
            expected[y0:y1, x0:x1] = 255
        assert np.array_equal(mask, expected), row["id"]

        label = step_dir / "yolo" / "labels" / row["split"] / f"{row['id']}.txt"
        assert (step_dir / "yolo" / "images" / row["split"] / f"{row['id']}.jpg").is_file()
        from_yolo = boxes_from_yolo(label.read_text(), row["width"], row["height"], classes)
        from_xml = xml_boxes(root / row["annotation"])
        assert [b.label for b in from_yolo] == [b.label for b in from_xml]
        coords = lambda boxes: np.array([[b.xmin, b.ymin, b.xmax, b.ymax] for b in boxes])  # noqa: E731
        np.testing.assert_allclose(coords(from_yolo), coords(from_xml), atol=1e-3)

        copy = np.asarray(Image.open(step_dir / row["image"]))
        assert copy.ndim == 3 and copy.shape[2] == 3
        assert np.array_equal(copy[..., 0], copy[..., 1]) and np.array_equal(copy[..., 0], copy[..., 2])
    return rows


def check_split_balance(rows: list[dict], fractions=(0.70, 0.15, 0.15)) -> None:
    for name in NEU_DET_CLASSES:
        n = sum(r["class"] == name for r in rows)
        n_val, n_test = round(n * fractions[1]), round(n * fractions[2])
        got = {split: sum(r["class"] == name and r["split"] == split for r in rows) for split in ("train", "val", "test")}
        assert got == {"train": n - n_val - n_test, "val": n_val, "test": n_test}, name


def test_sample_counts_masks_yolo_and_balance(step0_sample_dir: Path, tmp_path: Path) -> None:
    step_dir = step0_sample_dir / "step0_prepare"
    summary = read_json(step_dir / "summary.json")
    assert summary["images_valid"] == 60 and summary["images_skipped"] == 0
    assert summary["boxes"] == sum(len(xml_boxes(p)) for p in (SAMPLE_ROOT / "ANNOTATIONS").glob("*.xml"))
    assert summary["split_sizes"] == {"train": 36, "val": 12, "test": 12}
    rows = check_outputs(SAMPLE_ROOT, step_dir, list(NEU_DET_CLASSES))
    check_split_balance(rows)
    for split in ("train", "val", "test"):
        listed = (step_dir / "splits" / f"{split}.txt").read_text().split()
        assert listed == sorted(r["id"] for r in rows if r["split"] == split)
    assert Image.open(step_dir / "images" / f"{rows[0]['id']}.png").size == (64, 64)
    assert summary["config_hash"] and (step_dir / "config.yaml").is_file()
    assert load_config(step_dir / "config.yaml").prepare.resolution == 64  # the saved config reloads
    dataset = check_yolo_dataset(step_dir / "yolo" / "data.yaml", tmp_path / "yolo-settings")
    assert dataset["nc"] == 6 and Path(dataset["train"]).is_dir()
    assert Image.open(step_dir / "contact_sheet.png").size[1] == 6 * 200


def test_rerun_does_nothing_and_config_change_redoes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    prepare(SAMPLE_ROOT, out)
    manifest = out / "step0_prepare" / "manifest.jsonl"
    before = manifest.stat().st_mtime_ns
    assert prepare(SAMPLE_ROOT, out).get("up_to_date")
    assert manifest.stat().st_mtime_ns == before
    redone = prepare(SAMPLE_ROOT, out, "prepare.resolution=32")
    assert not redone.get("up_to_date") and redone["images_written"] == 60
    copies = sorted((out / "step0_prepare" / "images").iterdir())
    assert len(copies) == 60 and Image.open(copies[0]).size == (32, 32)
    assert prepare(SAMPLE_ROOT, out, "prepare.resolution=32", "prepare.workers=1").get("up_to_date")


def test_interrupted_run_continues_where_it_stopped(tmp_path: Path) -> None:
    out = tmp_path / "run"
    prepare(SAMPLE_ROOT, out)
    step_dir = out / "step0_prepare"
    # Simulate a crash: no summary yet, some per-image files not written.
    (step_dir / "summary.json").unlink()
    missing = sorted((step_dir / "masks").iterdir())[:5]
    for mask in missing:
        mask.unlink()
    summary = prepare(SAMPLE_ROOT, out)
    assert summary["resumed"] and summary["images_written"] == 5
    assert all(mask.is_file() for mask in missing)


def test_two_runs_give_identical_bytes(tmp_path: Path) -> None:
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        prepare(SAMPLE_ROOT, out, "prepare.workers=1" if out.name == "a" else "prepare.workers=2")

    def files(out: Path) -> dict[str, bytes]:
        base = out / "step0_prepare"
        return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file() and p.name not in RUN_SPECIFIC}

    first, second = files(runs[0]), files(runs[1])
    assert first.keys() == second.keys() and len(first) > 200
    assert [k for k in first if first[k] != second[k]] == []


def test_kaggle_layout_is_detected(tmp_path: Path) -> None:
    root = tmp_path / "NEU-DET"
    for i, xml in enumerate(sorted((SAMPLE_ROOT / "ANNOTATIONS").glob("*.xml"))):
        split = "validation" if i % 5 == 0 else "train"
        name = class_from_stem(xml.stem, list(NEU_DET_CLASSES))
        (root / split / "images" / name).mkdir(parents=True, exist_ok=True)
        (root / split / "annotations").mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLE_ROOT / "IMAGES" / f"{xml.stem}.jpg", root / split / "images" / name)
        shutil.copy(xml, root / split / "annotations")
    summary = prepare(root, tmp_path / "out")
    assert summary["layout"] == "kaggle" and summary["images_valid"] == 60
    reference = prepare(SAMPLE_ROOT, tmp_path / "ref")
    assert summary["split_sizes"] == reference["split_sizes"]
    assert (tmp_path / "out/step0_prepare/splits/train.txt").read_text() == (tmp_path / "ref/step0_prepare/splits/train.txt").read_text()


# --------------------------------------------------------------------------- bad input


def _small_dataset(root: Path, n_per_class: int = 2) -> Path:
    (root / "IMAGES").mkdir(parents=True)
    (root / "ANNOTATIONS").mkdir()
    for name in NEU_DET_CLASSES:
        for xml in sorted((SAMPLE_ROOT / "ANNOTATIONS").glob(f"{name}_*.xml"))[:n_per_class]:
            shutil.copy(xml, root / "ANNOTATIONS")
            shutil.copy(SAMPLE_ROOT / "IMAGES" / f"{xml.stem}.jpg", root / "IMAGES")
    return root


def _first(root: Path, prefix: str) -> str:
    return sorted(p.stem for p in (root / "ANNOTATIONS").glob(f"{prefix}_*.xml"))[0]


def _edit_xml(root: Path, stem: str, edit) -> None:
    path = root / "ANNOTATIONS" / f"{stem}.xml"
    tree = ET.parse(path)
    edit(tree.getroot())
    tree.write(path)


def _set_box(obj: ET.Element, coords: tuple[str, str, str, str]) -> None:
    for key, value in zip(("xmin", "ymin", "xmax", "ymax"), coords):
        obj.find("bndbox").find(key).text = value


BAD_INPUTS = {
    # name: (how to break the stem's files, expected problem text, action, file suffix)
    "corrupt_jpeg": (lambda r, s: (r / "IMAGES" / f"{s}.jpg").write_bytes(b"\xff\xd8 not a jpeg"), "corrupt or truncated image", "skipped image", ".jpg"),
    "truncated_jpeg": (lambda r, s: (r / "IMAGES" / f"{s}.jpg").write_bytes((r / "IMAGES" / f"{s}.jpg").read_bytes()[:2000]), "corrupt or truncated image", "skipped image", ".jpg"),
    "missing_xml": (lambda r, s: (r / "ANNOTATIONS" / f"{s}.xml").unlink(), "no annotation XML", "skipped image", ".jpg"),
    "malformed_xml": (lambda r, s: (r / "ANNOTATIONS" / f"{s}.xml").write_text("<annotation><object>"), "malformed XML", "skipped image", ".xml"),
    "no_objects": (lambda r, s: _edit_xml(r, s, lambda root: [root.remove(o) for o in root.findall("object")]), "no <object> boxes", "skipped image", ".xml"),
    "unknown_class": (lambda r, s: _edit_xml(r, s, lambda root: setattr(root.find("object").find("name"), "text", "rust")), "unknown class 'rust'", "dropped box", ".xml"),
    "box_outside": (lambda r, s: _edit_xml(r, s, lambda root: _set_box(root.find("object"), ("-5", "10", "230", "50"))), "extends outside", "clipped box", ".xml"),
    "degenerate_box": (lambda r, s: _edit_xml(r, s, lambda root: _set_box(root.find("object"), ("50", "10", "50", "60"))), "empty or outside", "dropped box", ".xml"),
    "escaping_filename": (lambda r, s: _edit_xml(r, s, lambda root: setattr(root.find("filename"), "text", "../../etc/passwd")), "points outside the image folder", "skipped image", ".xml"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_skipped_and_reported(tmp_path: Path, case: str) -> None:
    root = _small_dataset(tmp_path / "data")
    stem = _first(root, "scratches")
    breaker, expected, action, suffix = BAD_INPUTS[case]
    breaker(root, stem)
    summary = prepare(root, tmp_path / "out")
    problems = [p for p in summary["problems"] if stem in p["file"]]
    assert len(problems) >= 1, summary["problems"]
    assert expected in problems[0]["problem"] and problems[0]["action"] == action
    assert problems[0]["file"].endswith(stem + suffix)
    valid_ids = {row["id"] for row in read_jsonl(tmp_path / "out/step0_prepare/manifest.jsonl")}
    assert (stem in valid_ids) == (action != "skipped image" and summary["images_valid"] == 12)


@pytest.mark.parametrize("case", ["truncated_jpeg", "unknown_class", "escaping_filename"])
def test_strict_mode_fails_with_one_line_and_writes_no_summary(tmp_path: Path, case: str) -> None:
    root = _small_dataset(tmp_path / "data")
    stem = _first(root, "scratches")
    BAD_INPUTS[case][0](root, stem)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "neu_det_pipeline.step0_prepare", "--config", str(SMOKE_CONFIG),
         f"data.root={root}", f"run.output_dir={out}", "run.tiny_models_dir=null", "data.strict=true"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and stem in lines[0] and "data.strict=false" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "step0_prepare" / "summary.json").exists()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], "temporary files left behind"


def test_non_strict_exit_code_is_zero_with_problems(tmp_path: Path) -> None:
    root = _small_dataset(tmp_path / "data")
    BAD_INPUTS["corrupt_jpeg"][0](root, _first(root, "patches"))
    result = subprocess.run(
        [sys.executable, "-m", "neu_det_pipeline.step0_prepare", "--config", str(SMOKE_CONFIG),
         f"data.root={root}", f"run.output_dir={tmp_path / 'out'}", "run.tiny_models_dir=null"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "input problems" in result.stderr and "corrupt or truncated image" in result.stderr


def test_missing_dataset_folder_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "neu_det_pipeline.step0_prepare", "--config", str(SMOKE_CONFIG),
         f"data.root={tmp_path / 'nowhere'}", f"run.output_dir={tmp_path / 'out'}", "run.tiny_models_dir=null"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and "does not exist" in result.stderr and "data.root" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- the real 1500 images


@pytest.mark.skipif(not (SHARED_NEU_DET / "IMAGES").is_dir(), reason="../shared/neu-det is not present")
def test_real_neu_det_1500(tmp_path: Path) -> None:
    summary = prepare(SHARED_NEU_DET, tmp_path / "out")
    n_images = len(list((SHARED_NEU_DET / "IMAGES").glob("*.jpg")))
    assert summary["pairs_found"] == n_images and summary["images_valid"] + summary["images_skipped"] == n_images
    assert summary["boxes"] == sum(s["boxes"] for s in summary["class_stats"].values())
    other = sum(s["boxes_of_other_class"] for s in summary["class_stats"].values())
    assert 0 < other < summary["boxes"] * 0.2  # the documented ~10% cross-class boxes survive as annotated
    step_dir = tmp_path / "out" / "step0_prepare"
    rows = check_outputs(SHARED_NEU_DET, step_dir, list(NEU_DET_CLASSES))
    check_split_balance(rows)
    assert check_yolo_dataset(step_dir / "yolo" / "data.yaml", tmp_path / "yolo-settings")["nc"] == 6
    assert json.loads((step_dir / "summary.json").read_text())["layout"] == "original"
