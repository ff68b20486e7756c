"""Step 4's inpaint modes and the transplant layout: the regenerated region, the exact paste-back, the new labels.

Exactness is checked on the written PNGs against the real source image (moved by the layout augmentation), at pixels
whose distance from every box (and seam band) is computed here independently of `generation.regions`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_ROOT, SMOKE_CONFIG
from PIL import Image
from test_step4_generate import TEMPLATE_PROMPTS, config_for, pixels, with_step0

from neu_det_pipeline.artifacts import MANIFEST_FILE
from neu_det_pipeline.config import load_config
from neu_det_pipeline.data.export import box_mask, boxes_from_yolo
from neu_det_pipeline.data.neu_det import Box
from neu_det_pipeline.generation.controls import augment_box, augment_image
from neu_det_pipeline.generation.regions import feather_outside, paste_back, pipeline_mask, regeneration_weights
from neu_det_pipeline.io import read_jsonl
from neu_det_pipeline.recipe import run_step
from neu_det_pipeline.step4_generate import STEP

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DILATION = 3


def chebyshev_distance_to_boxes(boxes: list[Box], width: int, height: int) -> np.ndarray:
    """Per pixel: how many pixels (max-norm, >= the Euclidean distance's floor) it lies outside the nearest box; 0 inside."""
    ys, xs = np.mgrid[0:height, 0:width]
    distance = np.full((height, width), np.inf)
    for box in boxes:
        x0, y0, x1, y1 = round(box.xmin), round(box.ymin), round(box.xmax), round(box.ymax)
        dx = np.maximum(np.maximum(x0 - xs, xs - (x1 - 1)), 0)
        dy = np.maximum(np.maximum(y0 - ys, ys - (y1 - 1)), 0)
        distance = np.minimum(distance, np.maximum(dx, dy))
    return distance


def source_pixels(row: dict, sources: dict[str, dict]) -> np.ndarray:
    source = sources[row["source"]]
    with Image.open(SAMPLE_ROOT / source["source"]) as image:
        return np.asarray(augment_image(image.convert("L"), row["augmentation"]), dtype=np.int16)


# --------------------------------------------------------------------------------------------- regions


def test_feathered_weights_follow_the_distance_from_the_boxes() -> None:
    box = Box("crazing", 10, 10, 20, 20)
    weights = regeneration_weights("inpaint_defects", [box], 40, 40, dilation=4)
    assert np.all(weights[10:20, 10:20] == 1)  # the box is regenerated as generated
    # Straight out of the box edge: 1 - d / (dilation + 1) at d = 1..4, 0 from d = 5 on.
    np.testing.assert_allclose(weights[15, 20:26], [0.8, 0.6, 0.4, 0.2, 0.0, 0.0], atol=1e-6)
    background = regeneration_weights("inpaint_background", [box], 40, 40, dilation=4)
    np.testing.assert_allclose(background, 1 - weights, atol=1e-6)
    assert np.all(background[10:20, 10:20] == 0)  # the real defect is kept exactly
    hard = regeneration_weights("inpaint_defects", [box], 40, 40, dilation=0)
    np.testing.assert_array_equal(hard, np.asarray(box_mask([box], 40, 40)) / 255)
    seam = np.zeros((40, 40), dtype=np.uint8)
    seam[30:32, :] = 255  # a seam band is regenerated in both modes
    assert np.all(regeneration_weights("inpaint_background", [box], 40, 40, 4, seam)[30:32] == 1)
    assert np.all(regeneration_weights("inpaint_defects", [box], 40, 40, 4, seam)[30:32] == 1)
    assert feather_outside(np.zeros((5, 5), bool), 3).sum() == 0


def test_paste_back_is_exact_where_the_weight_is_zero_and_the_mask_covers_the_region() -> None:
    rng = np.random.default_rng(0)
    generated, source = (Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)) for _ in range(2))
    weights = regeneration_weights("inpaint_defects", [Box("patches", 8, 8, 16, 12)], 32, 32, dilation=2)
    mixed = np.asarray(paste_back(generated, source, weights), dtype=np.int16)
    np.testing.assert_array_equal(mixed[weights == 0], np.asarray(source)[weights == 0])
    np.testing.assert_array_equal(mixed[weights == 1], np.asarray(generated)[weights == 1])
    half = (weights > 0) & (weights < 1)
    expected = np.rint(weights * np.asarray(generated, float) + (1 - weights) * np.asarray(source, float))
    np.testing.assert_array_equal(mixed[half], expected[half])
    mask = np.asarray(pipeline_mask(weights, 64))  # generation at twice the output size
    covered = np.asarray(Image.fromarray(mask).resize((32, 32), Image.Resampling.NEAREST)) > 0
    assert covered[weights > 0].all() and not covered[weights == 0].all()


# ------------------------------------------------------------------------------------------- the step


@pytest.mark.parametrize(
    ("mode", "family", "base"),
    [
        ("inpaint_defects", ("generation.controls=[softedge]",), "sd15-inpaint"),  # the dedicated 9-channel checkpoint
        ("inpaint_background", ("generation.controls=[softedge]",), "sd15"),
        ("inpaint_defects", ("models.pipeline=sdxl", "generation.controls=[softedge]"), "sdxl-inpaint"),
        ("inpaint_background", ("models.pipeline=sdxl", "generation.union_controlnet=true", "generation.controls=[softedge,depth]"), "sdxl"),
    ],
    ids=["sd15-dedicated", "sd15", "sdxl-dedicated", "sdxl-union"],
)
def test_inpaint_modes_keep_the_source_exactly_outside_the_regenerated_region(
    mode: str, family: tuple[str, ...], base: str, tiny_models_dir: Path, step0_sample_dir: Path, tmp_path: Path
) -> None:
    out = with_step0(step0_sample_dir, tmp_path / "run", classes=("crazing",))
    dedicated = (f"models.{base.removesuffix('-inpaint')}_inpaint={tiny_models_dir / base}",) if base.endswith("-inpaint") else ()
    overrides = (
        *TEMPLATE_PROMPTS, f"generation.mode={mode}", f"generation.mask_dilation={DILATION}", "generation.strength=1.0",
        "generation.images_per_source=2", "generation.layout_augmentations=[rot90]", *family, *dedicated,
    )
    run_step(STEP, config_for(tiny_models_dir, out, *overrides))
    step_dir = out / STEP.name
    rows = read_jsonl(step_dir / MANIFEST_FILE)
    sources = {row["id"]: row for row in read_jsonl(out / "step0_prepare" / MANIFEST_FILE)}
    assert len(rows) == 2 and {row["augmentation"] for row in rows} == {"none", "rot90"}
    assert {row["models"]["base"] for row in rows} == {str(tiny_models_dir / base)}
    for row in rows:
        source = sources[row["source"]]
        boxes = [augment_box(Box(**box), 200, 200, row["augmentation"]) for box in source["boxes"]]
        assert [Box(**box) for box in row["boxes"]] == boxes  # the labels are the source's, moved with the layout
        assert row["mode"] == mode and row["mask_dilation"] == DILATION
        written, real = pixels(step_dir / row["file"]), source_pixels(row, sources)
        distance = chebyshev_distance_to_boxes(boxes, 200, 200)
        kept = distance > DILATION if mode == "inpaint_defects" else distance == 0
        regenerated = distance == 0 if mode == "inpaint_defects" else distance > DILATION
        np.testing.assert_array_equal(written[kept], real[kept])
        # The random tiny VAE cannot reproduce the source: regenerated pixels differ by tens of grey levels.
        assert np.abs(written[regenerated] - real[regenerated]).mean() > 10


def test_transplant_adds_labelled_defects_and_records_where_they_came_from(
    tiny_models_dir: Path, step0_sample_dir: Path, tmp_path: Path
) -> None:
    out = with_step0(step0_sample_dir, tmp_path / "run", classes=("scratches",), per_class=2)
    overrides = (
        *TEMPLATE_PROMPTS, "generation.mode=inpaint_defects", f"generation.mask_dilation={DILATION}", "generation.layout=transplant",
        "generation.transplant_count=1", "generation.transplant_seam_width=2", "generation.layout_augmentations=[hflip]",
        "generation.controls=[softedge]",
    )
    summary = run_step(STEP, config_for(tiny_models_dir, out, *overrides))
    step_dir = out / STEP.name
    rows = read_jsonl(step_dir / MANIFEST_FILE)
    sources = {row["id"]: row for row in read_jsonl(out / "step0_prepare" / MANIFEST_FILE)}
    assert summary["images"] == len(rows) == 2 and {row["augmentation"] for row in rows} == {"none", "hflip"}
    classes = load_config(SMOKE_CONFIG).data.classes
    for row in rows:
        source = sources[row["source"]]
        own = [augment_box(Box(**box), 200, 200, row["augmentation"]) for box in source["boxes"]]
        boxes = [Box(**box) for box in row["boxes"]]
        placed = row["transplant"]["placed"]
        assert row["layout"] == "transplant" and row["transplant"]["requested"] == 1 and len(placed) == 1
        assert boxes[: len(own)] == own and len(boxes) == len(own) + 1  # the source's boxes, then the pasted one
        donor = placed[0]
        assert donor["donor"] != row["source"] and sources[donor["donor"]]["class"] == row["class"]
        new = boxes[-1]
        assert donor["box"] == [new.xmin, new.ymin, new.xmax, new.ymax]
        dx0, dy0, dx1, dy1 = donor["donor_box"]
        assert (new.xmax - new.xmin, new.ymax - new.ymin) == (round(dx1) - round(dx0), round(dy1) - round(dy0))
        assert [Box(**box) for box in sources[donor["donor"]]["boxes"]].count(Box(new.label, dx0, dy0, dx1, dy1)) == 1
        # The new box is inside the image and 2 px (the seam width) clear of every box of the source.
        assert 0 <= new.xmin and new.xmax <= 200 and 0 <= new.ymin and new.ymax <= 200
        assert chebyshev_distance_to_boxes(own, 200, 200)[round(new.ymin) : round(new.ymax), round(new.xmin) : round(new.xmax)].min() > 2
        # Every label format holds the new box.
        voc = ET.parse(step_dir / row["label"]).getroot()
        assert len(list(voc.iter("object"))) == len(boxes)
        np.testing.assert_array_equal(pixels(step_dir / row["mask"]), np.asarray(box_mask(boxes, 200, 200)))
        from_yolo = boxes_from_yolo((step_dir / row["yolo_label"]).read_text(), 200, 200, classes)
        np.testing.assert_allclose([[b.xmin, b.ymin, b.xmax, b.ymax] for b in from_yolo], [[b.xmin, b.ymin, b.xmax, b.ymax] for b in boxes], atol=1e-3)
        # Outside every box (the pasted one included: its seam band lies within 2 px of it) and the dilation, the
        # pixels are the real source's.
        kept = chebyshev_distance_to_boxes(boxes, 200, 200) > DILATION + 2
        np.testing.assert_array_equal(pixels(step_dir / row["file"])[kept], source_pixels(row, sources)[kept])


def test_defect_focus_experiment_is_in_the_ab_set() -> None:
    from conftest import REPO

    experiment = load_config(REPO / "configs" / "experiments" / "exp_d_defect_focus.yaml")
    generation = experiment.generation
    assert experiment.lora.loss_weighting == "box_weighted"
    assert (generation.mode, generation.layout, generation.select_by) == ("inpaint_defects", "transplant", "lpips_in_box")
    assert generation.candidates > 1
    assert "exp_d_defect_focus" in (REPO / "steps" / "run_ab.sh").read_text().split("experiments=(")[1].split(")")[0].split()
