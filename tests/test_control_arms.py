"""Step 5's control arms and fair protocol: classical boxes follow their pixels, copy-paste pastes donor pixels
without overlap, Step 4-layout datasets Step 6 reads, equal batches under the iteration budget, replace keeps the
size, and the paired bootstrap on hand-made detections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neu_det_pipeline.artifacts import MANIFEST_FILE
from neu_det_pipeline.classifier.data import synthetic_examples
from neu_det_pipeline.config import UtilityConfig
from neu_det_pipeline.data.neu_det import Box
from neu_det_pipeline.evaluation import control_arms as arms
from neu_det_pipeline.evaluation.utility import (
    TrainImage,
    arms_not_run,
    average_precision,
    batches_per_epoch,
    epochs_for_budget,
    match_detections,
    paired_bootstrap,
    replace_subset,
    weighted_map50,
)
from neu_det_pipeline.io import read_jsonl

CLASSES = ["crazing", "inclusion"]


def _real(tmp_path: Path, name: str, pixels: np.ndarray, boxes: list[Box], image_class: str = "crazing") -> arms.RealImage:
    path = tmp_path / f"{name}.png"
    Image.fromarray(pixels, mode="L").save(path)
    return arms.RealImage(name, image_class, path, tuple(boxes))


@pytest.mark.parametrize("seed", range(12))
def test_classical_boxes_go_where_their_pixels_go(tmp_path: Path, seed: int) -> None:
    pixels = np.zeros((64, 64), dtype=np.uint8)
    pixels[20:28, 10:31] = 255  # an off-centre, non-square bright defect: flips and rotations all move it
    image = _real(tmp_path, "a", pixels, [Box("crazing", 10, 20, 31, 28)])
    out, boxes, applied = arms.classical_image(image, seed)
    assert out.shape == pixels.shape and len(boxes) == 1
    bright = np.argwhere(out > (int(out.max()) + int(out.min())) / 2)
    (y0, x0), (y1, x1) = bright.min(axis=0), bright.max(axis=0) + 1
    box = boxes[0]
    # Resizing by the box-safe crop lands edges between pixels and blur softens them: one pixel of tolerance.
    assert abs(box.xmin - x0) <= 1 and abs(box.xmax - x1) <= 1 and abs(box.ymin - y0) <= 1 and abs(box.ymax - y1) <= 1, (applied, box, (x0, y0, x1, y1))


def test_copy_paste_pastes_donor_pixels_without_overlap(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    target = _real(tmp_path, "t", rng.integers(0, 256, (80, 80), dtype=np.uint8), [Box("crazing", 0, 0, 40, 40)])
    donor_pixels = rng.integers(0, 256, (80, 80), dtype=np.uint8)
    donor = _real(tmp_path, "d", donor_pixels, [Box("inclusion", 50, 50, 70, 66)])
    other_class = _real(tmp_path, "o", donor_pixels, [Box("crazing", 5, 5, 25, 25)], "inclusion")
    for seed in range(5):
        pixels, boxes, pasted = arms.copy_paste_image(target, [target, donor, other_class], seed)
        assert boxes[0] == target.boxes[0] and len(boxes) == 2 and pasted[0]["donor"] == "d"  # never itself or another class
        new = boxes[1]
        assert new.label == "inclusion" and (new.xmax - new.xmin, new.ymax - new.ymin) == (20, 16)
        assert new.xmin >= 40 or new.ymin >= 40  # no overlap with the target's box
        x, y, f = int(new.xmin), int(new.ymin), arms.FEATHER_PX
        np.testing.assert_array_equal(pixels[y + f : y + 16 - f, x + f : x + 20 - f], donor_pixels[50 + f : 66 - f, 50 + f : 70 - f])
        outside = np.ones_like(pixels, dtype=bool)
        outside[y : y + 16, x : x + 20] = False
        np.testing.assert_array_equal(pixels[outside], target.pixels()[outside])


def test_copy_paste_scales_down_to_the_free_space_or_gives_up(tmp_path: Path) -> None:
    donor = _real(tmp_path, "d", np.zeros((40, 40), dtype=np.uint8), [Box("crazing", 5, 5, 30, 30)])
    narrow = _real(tmp_path, "n", np.zeros((40, 40), dtype=np.uint8), [Box("crazing", 0, 0, 40, 28)])  # 12 free rows
    _, boxes, pasted = arms.copy_paste_image(narrow, [donor], 0)
    # 25 px at 0.75 (19 px) does not fit, at 0.5 (12 px) exactly: only on the last 12 rows.
    assert pasted[0]["scale"] == 0.5 and (boxes[1].ymin, boxes[1].ymax) == (28, 40) and boxes[1].xmax - boxes[1].xmin == 12
    full = _real(tmp_path, "t", np.zeros((40, 40), dtype=np.uint8), [Box("crazing", 0, 0, 40, 40)])
    assert arms.copy_paste_image(full, [donor], 0) is None


def test_arm_datasets_in_step4_layout_one_per_target_deterministic_and_read_by_step6(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = [_real(tmp_path, f"{c}_{k}", rng.integers(0, 256, (48, 48), dtype=np.uint8), [Box(c, 2, 2, 20, 18)], c)
              for c in CLASSES for k in range(3)]
    targets = arms.round_robin_targets(images, {"crazing": 4, "inclusion": 2}, seed=0)
    assert [t.image_class for t in targets] == ["crazing"] * 4 + ["inclusion"] * 2
    assert len({t.id for t in targets[:3]}) == 3  # every image once before any twice
    for arm in (arms.CLASSICAL, arms.COPY_PASTE):
        folder = arms.arm_dataset_dir(tmp_path / "step5", arms.ARM_FOLDERS[arm], 0)
        rows = arms.write_arm_dataset(folder, arm, targets, images, 0, CLASSES)
        assert [r["slot"] for r in rows] == list(range(len(targets))) and [r["class"] for r in rows] == [t.image_class for t in targets]
        assert sorted(r["name"] for r in read_jsonl(folder / MANIFEST_FILE)) == sorted(r["name"] for r in rows)
        for row in rows:
            for key in ("file", "label", "mask", "yolo_image", "yolo_label"):
                assert (folder / row[key]).is_file()
            assert len((folder / row["yolo_label"]).read_text().splitlines()) == len(row["boxes"])
        again = arms.write_arm_dataset(tmp_path / "again" / arm, arm, targets, images, 0, CLASSES)
        for first, second in zip(rows, again):
            np.testing.assert_array_equal(np.asarray(Image.open(folder / first["file"])), np.asarray(Image.open(tmp_path / "again" / arm / second["file"])))
        examples = synthetic_examples(folder, arms.ARM_FOLDERS[arm], CLASSES)  # `classifier.synthetic: classical | copy_paste`
        assert len(examples) == len(rows) and all(e.mask.is_file() for e in examples)


def test_copy_paste_skips_a_class_without_room(tmp_path: Path) -> None:
    covered = [_real(tmp_path, f"crazing_{k}", np.zeros((40, 40), dtype=np.uint8), [Box("crazing", 0, 0, 40, 40)]) for k in range(2)]
    roomy = [_real(tmp_path, f"inclusion_{k}", np.zeros((40, 40), dtype=np.uint8), [Box("inclusion", 0, 0, 20, 20)], "inclusion") for k in range(2)]
    targets = [covered[0], roomy[0], covered[1], roomy[1]]
    rows = arms.write_arm_dataset(tmp_path / "cp", arms.COPY_PASTE, targets, covered + roomy, 0, CLASSES)
    assert [(r["slot"], r["class"]) for r in rows] == [(1, "inclusion"), (3, "inclusion")]


def test_iteration_budget_gives_every_arm_the_same_batches() -> None:
    config = UtilityConfig(budget="iterations", iterations=200, batch=16)
    for sizes in ((160, 320, 800), (102, 204, 1044)):
        batches = [epochs_for_budget(n, config, sizes[0]) * batches_per_epoch(n, 16) for n in sizes]
        if sizes[0] == 160:
            assert batches == [200, 200, 200]  # sizes whose epochs divide the budget: exactly equal
        else:  # whole epochs: at most half an epoch's batches from the budget
            assert all(abs(b - 200) <= batches_per_epoch(n, 16) / 2 for b, n in zip(batches, sizes))
    # Default budget: the real-only set's epochs; `epochs` budget: the same epochs whatever the size.
    assert epochs_for_budget(320, UtilityConfig(budget="iterations", epochs=10, batch=16), 160) == 5
    assert epochs_for_budget(320, UtilityConfig(epochs=10), 160) == 10


def test_replace_keeps_the_training_set_size() -> None:
    real = [TrainImage(f"r{i}", Path(f"r{i}.jpg"), Path(f"r{i}.txt")) for i in range(10)]
    added = [TrainImage(f"a{i}", Path(f"a{i}.png"), Path(f"a{i}.txt")) for i in range(4)]
    mixed = replace_subset(real, added, 0)
    assert len(mixed) == 10 and set(added) <= set(mixed) and len(set(mixed) & set(real)) == 6
    assert replace_subset(real, added, 0) == mixed
    many = [TrainImage(f"b{i}", Path(f"b{i}.png"), Path(f"b{i}.txt")) for i in range(15)]
    assert replace_subset(real, many, 0) == many[:10]


def _box(label: int, x: float, conf: float | None = None) -> dict:
    box = {"label": label, "xmin": x, "ymin": 0.0, "xmax": x + 10, "ymax": 10.0}
    return box if conf is None else {**box, "conf": conf}


def test_paired_bootstrap_on_hand_made_detections() -> None:
    truth = [[_box(0, 0)] for _ in range(4)]
    mixed = match_detections([[_box(0, 0, 0.9)], [], [_box(0, 50, 0.6), _box(0, 0, 0.5)], []], truth, 1)
    assert mixed.true_positive.tolist() == [True, False, True]  # sorted by confidence; the far box misses
    half = match_detections([[_box(0, 0, 0.9)], [_box(0, 0, 0.8)], [], []], truth, 1)  # finds images 0 and 1
    full = match_detections([[_box(0, 0, 0.9)], [_box(0, 0, 0.8)], [_box(0, 1, 0.7)], [_box(0, 0, 0.5)]], truth, 1)
    # Recall r at precision 1, then ultralytics' straight line to (recall 1, precision 0): AP = (1 + r) / 2; at
    # r = 1 the last of the 101 points reads precision 0, so the trapezoid loses half a step: 0.995.
    assert weighted_map50(half, np.ones(4))[0] == pytest.approx(0.75)
    assert weighted_map50(full, np.ones(4))[0] == pytest.approx(0.995)
    result = paired_bootstrap([full], [half], 400, seed=0)
    # A resample with a share s of images 2 and 3 gives a difference about s / 2 (0.995 when it holds only them,
    # where `half` finds nothing): s = 0 and s = 1 each have probability 1/16 > 2.5 %, so they bound the interval.
    assert result["difference"] == pytest.approx(0.245)
    assert result["ci95"] == pytest.approx([0.0, 0.995])
    same = paired_bootstrap([half], [half], 50, seed=0)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0]


def test_resample_weights_equal_duplicated_images() -> None:
    rng = np.random.default_rng(3)
    truth = [[_box(int(rng.integers(2)), float(x)) for x in rng.choice(80, 2, replace=False)] for _ in range(6)]
    found = [[_box(int(rng.integers(2)), float(rng.integers(80)), float(rng.random())) for _ in range(4)] for _ in range(6)]
    weights = np.array([2, 0, 1, 3, 1, 0])
    order = np.repeat(np.arange(6), weights)
    duplicated = match_detections([found[i] for i in order], [truth[i] for i in order], 2)
    assert weighted_map50(match_detections(found, truth, 2), weights.astype(float))[0] == pytest.approx(weighted_map50(duplicated, np.ones(len(order)))[0])


def test_average_precision_is_ultralytics_ap(tmp_path: Path) -> None:
    from neu_det_pipeline.yolo import prepare_offline_ultralytics

    prepare_offline_ultralytics(tmp_path)
    from ultralytics.utils.metrics import compute_ap

    rng = np.random.default_rng(0)
    recall = np.sort(rng.random(30))
    precision = rng.random(30)
    assert average_precision(recall, precision) == pytest.approx(compute_ap(recall, precision)[0])


def test_generation_seeds_make_the_plan_once_per_seed_and_tag_the_rows() -> None:
    from neu_det_pipeline.config import GenerationConfig
    from neu_det_pipeline.generation.plan import (
        build_plan,
        build_seeded_plan,
        tag_generation_seeds,
    )

    rows = [{"id": f"crazing_{i}", "class": "crazing"} for i in range(3)]
    prompts = {row["id"]: "p" for row in rows}
    single = GenerationConfig(images_per_source=1)
    assert build_seeded_plan(single, rows, prompts, 5) == build_plan(single, rows, prompts, 5)  # no list: unchanged
    seeded = build_seeded_plan(GenerationConfig(images_per_source=1, seeds=[5, 8]), rows, prompts, 0)
    assert len(seeded) == 6 and len({item.name for item in seeded}) == 6
    for seed in (5, 8):
        mine = [item for item in seeded if item.generation_seed == seed]
        # The same images as a single-seed run with that seed, renamed.
        assert [(i.name, i.seed) for i in mine] == [(f"{i.name}-g{seed}", i.seed) for i in build_plan(single, rows, prompts, seed)]
    tagged = tag_generation_seeds([{"name": item.name} for item in seeded], seeded)
    assert [row["generation_seed"] for row in tagged] == [item.generation_seed for item in seeded]
    assert tag_generation_seeds([{"name": "x"}], build_plan(single, rows, prompts, 5)) == [{"name": "x"}]


def test_utility_config_rejects_arms_without_real_and_repeated_seeds() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="must list `real`"):
        UtilityConfig(arms=["real+synthetic", "oracle"])
    with pytest.raises(ValidationError, match="distinct seeds"):
        UtilityConfig(seeds=[0, 0])


def test_arms_with_nothing_to_train_on_are_named_with_the_fix() -> None:
    assert arms_not_run(UtilityConfig(), held_out_images=12) == {}
    assert list(arms_not_run(UtilityConfig(), held_out_images=0)) == ["oracle"]
    assert "data.train_fraction < 1" in arms_not_run(UtilityConfig(), 0)["oracle"]
    real_only = arms_not_run(UtilityConfig(synthetic_ratios=[0.0], arms=["real", "real+synthetic", "real+classical"]), 5)
    assert real_only == dict.fromkeys(["real+synthetic", "real+classical"], "evaluation.utility.synthetic_ratios has no ratio > 0")


def test_step6_reads_a_control_arm_of_the_first_generation_seed(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from neu_det_pipeline.config import PipelineConfig
    from neu_det_pipeline.step6_classifier import required_steps, synthetic_folder

    config = PipelineConfig.model_validate({"classifier": {"synthetic": "copy_paste"}, "generation": {"seeds": [7, 3]}})
    ctx = SimpleNamespace(config=config, upstream_dir=lambda step: tmp_path / step)
    assert synthetic_folder(ctx) == tmp_path / "step5_evaluate" / "control_arms" / "copy_paste-g7"
    assert required_steps(config) == ("step0_prepare", "step5_evaluate")
