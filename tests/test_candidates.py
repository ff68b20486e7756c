"""Step 4's candidate selection: several images per planned image, one kept, every score recorded, resumable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_step4_generate import TEMPLATE_PROMPTS, config_for, pixels, with_step0

from neu_det_pipeline.artifacts import MANIFEST_FILE
from neu_det_pipeline.config import GenerationConfig
from neu_det_pipeline.errors import ConfigError
from neu_det_pipeline.generation.plan import candidate_seed, image_seed
from neu_det_pipeline.generation.selection import class_consistent, select_candidate
from neu_det_pipeline.io import read_jsonl
from neu_det_pipeline.recipe import run_step
from neu_det_pipeline.step4_generate import STEP

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_selection_rules() -> None:
    scores = [
        {"clip": 0.30, "lpips_in_box": 0.9},  # most different from the source, but the worst class match
        {"clip": 0.50, "lpips_in_box": 0.4},
        {"clip": 0.40, "lpips_in_box": 0.6},
        {"clip": 0.45, "lpips_in_box": 0.5},
    ]
    assert select_candidate("none", scores) == 0
    assert select_candidate("clip", scores) == 1
    # Median CLIP score 0.425: candidates 1 and 3 are class-consistent; of those, 3 differs most inside the boxes.
    assert class_consistent(scores) == [False, True, False, True]
    assert select_candidate("lpips_in_box", scores) == 3
    assert select_candidate("lpips_in_box", [{"clip": 0.2, "lpips_in_box": 0.1}]) == 0
    assert candidate_seed(7, 0) == 7 and len({candidate_seed(7, k) for k in range(4)}) == 4


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["generation.candidates=3"], "generation.select_by=clip or lpips_in_box"),
        (["generation.mode=inpaint_background", "generation.select_by=lpips_in_box"], "generation.select_by=clip"),
    ],
)
def test_selection_config_errors_name_the_keys(overrides: list[str], expected: str, make_config) -> None:
    with pytest.raises(ConfigError, match=expected):
        make_config(*overrides)
    assert GenerationConfig(candidates=3, select_by="clip").candidates == 3


def test_only_the_kept_candidate_is_written_and_a_resumed_run_keeps_the_same_one(
    tiny_models_dir: Path, step0_sample_dir: Path, tmp_path: Path
) -> None:
    out = with_step0(step0_sample_dir, tmp_path / "run", classes=("patches",))
    config = config_for(
        tiny_models_dir, out, *TEMPLATE_PROMPTS, "generation.controls=[softedge]", "generation.images_per_source=2",
        "generation.candidates=3", "generation.select_by=lpips_in_box",
        "generation.mode=inpaint_defects", "generation.strength=1.0",
    )
    run_step(STEP, config)
    step_dir = out / STEP.name
    rows = read_jsonl(step_dir / MANIFEST_FILE)
    assert len(rows) == 2 and sorted(p.name for p in (step_dir / "images" / "patches").iterdir()) == sorted(f"{r['name']}.png" for r in rows)
    for row in rows:
        seeds = [candidate["seed"] for candidate in row["candidates"]]
        base = image_seed(0, row["source"], int(row["name"].split("-s")[1][:3]))
        assert seeds == [candidate_seed(base, k) for k in range(3)]
        kept = [k for k, candidate in enumerate(row["candidates"]) if candidate["kept"]]
        assert kept == [select_candidate("lpips_in_box", row["candidates"])] and row["seed"] == seeds[kept[0]]
        assert [candidate["class_consistent"] for candidate in row["candidates"]] == class_consistent(row["candidates"])
        assert all(candidate["lpips_in_box"] > 0 for candidate in row["candidates"])  # regenerated boxes differ
        assert len({candidate["lpips_in_box"] for candidate in row["candidates"]}) == 3  # three different images

    # An interrupted run: one image and the summary gone. The resumed run remakes that image alone, the same candidate.
    lost = rows[1]
    first_pixels = pixels(step_dir / lost["file"])
    (step_dir / lost["file"]).unlink()
    (step_dir / "summary.json").unlink()
    summary = run_step(STEP, config)
    assert summary["resumed"] and summary["images_from_earlier_run"] == 1 and summary["images_generated"] == 1
    assert read_jsonl(step_dir / MANIFEST_FILE) == rows  # the same scores, the same kept candidate
    np.testing.assert_array_equal(pixels(step_dir / lost["file"]), first_pixels)
