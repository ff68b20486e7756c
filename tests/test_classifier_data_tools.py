"""`neu-det data organize | dummy | check` and Step 6's check of `classifier.own_data` (no training here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neu_det_pipeline import cli
from neu_det_pipeline.classifier.data import own_data
from neu_det_pipeline.classifier.data_tools import check_dataset, dummy, organize
from neu_det_pipeline.errors import DataError
from neu_det_pipeline.recipe import run_step
from neu_det_pipeline.step6_classifier import STEP


def labels(root: Path, split: str) -> dict[str, str]:
    return dict(line.split(",") for line in (root / f"{split}_labels.txt").read_text().splitlines())


def test_dummy_set_is_clean_and_loads_as_own_data(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert cli.main(["data", "dummy", "--out", str(out), "--num-defect", "5", "--num-normal", "4", "--size", "32"]) == 0
    train, val = labels(out, "train"), labels(out, "val")
    assert sorted(val.values()) == ["0", "1"] and len(train) + len(val) == 9  # round(0.2 * 5) = round(0.2 * 4) = 1
    assert check_dataset(out) == []
    data = own_data(out)
    assert data.classes == ["0", "1"]
    for example in data.splits["train"] + data.splits["val"]:
        assert (example.mask is not None) == (data.classes[example.label] == "1")
        if example.mask is not None:
            with Image.open(example.mask) as mask:
                values = np.asarray(mask)
            assert set(np.unique(values)) == {0, 255}  # an exact mask with some defect pixels
    with pytest.raises(DataError, match="already exists and is not empty"):
        dummy(out, 2, 2)


def test_organize_matches_masks_binarises_them_and_splits_per_label(tmp_path: Path) -> None:
    defects, masks, normals = tmp_path / "defects", tmp_path / "masks", tmp_path / "normals"
    for folder in (defects, masks, normals):
        folder.mkdir()
    for i in range(6):
        Image.new("L", (40, 20), 100).save(defects / f"d{i}.jpg")
        mask = np.zeros((10, 20), dtype=np.uint8)  # half size, values 0/1: binarised and scaled to 40x20
        mask[2:5, 4:10] = 1
        Image.fromarray(mask).save(masks / (f"d{i}_mask.png" if i % 2 else f"d{i}.png"))
    for i in range(4):
        Image.new("L", (40, 20), 120).save(normals / f"n{i}.png")
    counts = organize(defects, masks, normals, tmp_path / "out", val_fraction=0.25, seed=3)
    out = tmp_path / "out"
    assert counts == {"train": 7, "val": 3, "test": 0} and not (out / "test_labels.txt").exists()
    val = labels(out, "val")
    assert sorted(val.values()) == ["0", "1", "1"]  # round(0.25 * 6) = 2 defect, round(0.25 * 4) = 1 normal
    assert sorted((out / "masks").iterdir()) == [out / "masks" / f"d{i}.png" for i in range(6)]
    with Image.open(out / "masks" / "d1.png") as mask:
        values = np.asarray(mask)
    assert mask.size == (40, 20) and values[4:10, 8:20].min() == 255 and values.sum() == 255 * 6 * 12
    assert check_dataset(out) == []
    organize(defects, masks, normals, tmp_path / "again", val_fraction=0.25, seed=3)
    assert labels(tmp_path / "again", "val") == val  # seeded

    (masks / "d0.png").unlink()
    with pytest.raises(DataError, match=r"1 defect image\(s\) have no mask .*d0.jpg"):
        organize(defects, masks, normals, tmp_path / "third")
    assert not (tmp_path / "third").exists()


def test_check_lists_every_problem_one_line_each(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    dummy(out, 6, 4, size=32)
    train = (out / "train_labels.txt").read_text().splitlines()
    defect_files = [line.split(",")[0] for line in train if line.endswith(",1")]
    normal_file = next(line.split(",")[0] for line in train if line.endswith(",0"))
    (out / "images" / "broken.png").write_bytes(b"not a png")
    Image.new("L", (32, 32), 90).save(out / "images" / "other.png")
    Image.new("L", (32, 32), 0).save(out / "masks" / "other.png")
    Image.new("RGB", (32, 32), (255, 0, 0)).save(out / "masks" / f"{Path(defect_files[0]).stem}.png")  # colour
    Image.new("L", (32, 8), 255).save(out / "masks" / f"{Path(defect_files[1]).stem}.png")  # another aspect ratio
    (out / "masks" / f"{Path(defect_files[2]).stem}.png").unlink()  # defect without a mask
    Image.new("L", (32, 32), 255).save(out / "masks" / f"{Path(normal_file).stem}.png")  # defect pixels on a normal image
    extra = [train[0], "other.png,2", "missing.png,1", "broken.png,1", "no label line"]
    (out / "train_labels.txt").write_text("\n".join(train + extra) + "\n")
    (out / "val_labels.txt").write_text((out / "val_labels.txt").read_text() + train[3] + "\n")
    expected = ["listed twice", "listed twice", "image " + str(out / "images" / "missing.png") + " not found", "broken.png: does not decode",
                "is not a `file,label` line", "numeric labels must be 0", "is a colour image", "another aspect ratio",
                f"defect image {defect_files[2]} has no mask", "has defect pixels but its image is labelled defect-free"]

    assert cli.main(["data", "check", str(out)]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[-1] == f"{out}: {len(expected)} problem(s)" and len(lines) == len(expected) + 1
    for fragment in expected:
        assert sum(fragment in line for line in lines[:-1]) == expected.count(fragment), fragment
    assert not any("has no mask" in problem for problem in check_dataset(out, require_masks=False))


def test_step6_checks_own_data_before_training(make_config, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    dummy(out, 4, 4, size=32)
    defect = next(file for file, label in labels(out, "train").items() if label == "1")
    (out / "masks" / f"{Path(defect).stem}.png").unlink()
    config = make_config(f"classifier.own_data={out}", output_dir=tmp_path / "run")
    with pytest.raises(DataError, match=rf"(?s)own_data={out} has 1 problem\(s\).*defect image {defect} has no mask"):
        run_step(STEP, config)
    assert not (tmp_path / "run" / STEP.name / "last.pt").exists()
