"""Step 5 end to end on a Step 4 folder fabricated from real sample images (per the Step 4 output contract):
curation reasons, YOLO utility with the low-data oracle, reports, resume, compare, and missing inputs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import SMOKE_CONFIG
from PIL import Image

from neu_det_pipeline.artifacts import MANIFEST_FILE
from neu_det_pipeline.data.export import yolo_label_lines
from neu_det_pipeline.data.neu_det import Box
from neu_det_pipeline.errors import MissingStepOutputError
from neu_det_pipeline.io import read_json, read_jsonl, write_json, write_jsonl
from neu_det_pipeline.recipe import run_step

STEP4 = "step4_generate"
PLANTED = {"hflip-copy": "hflip", "rot90-copy": "rot90", "blank": None}


def _synthetic_row(step4: Path, name: str, source: dict, pixels: np.ndarray, names: list[str], augmentation: str) -> dict:
    """Write one synthetic image with the files and manifest row the Step 4 contract lists."""
    image = Image.fromarray(pixels, mode="L")
    files = {"file": f"images/{source['class']}/{name}.png", "mask": f"masks/{name}.png", "label": f"labels/{name}.xml",
             "yolo_image": f"yolo/images/{name}.png", "yolo_label": f"yolo/labels/{name}.txt"}
    for key in ("file", "yolo_image"):
        (step4 / files[key]).parent.mkdir(parents=True, exist_ok=True)
        image.save(step4 / files[key])
    boxes = [Box(**b) for b in source["boxes"]]
    (step4 / files["yolo_label"]).parent.mkdir(parents=True, exist_ok=True)
    (step4 / files["yolo_label"]).write_text(yolo_label_lines(boxes, source["width"], source["height"], names))
    (step4 / files["label"]).parent.mkdir(parents=True, exist_ok=True)
    (step4 / files["label"]).write_text("<annotation/>")  # not read by Step 5
    return {"name": name, **files, "source": source["id"], "class": source["class"], "width": source["width"],
            "height": source["height"], "boxes": source["boxes"], "prompt": f"a grayscale photo of {source['class']} on a steel strip",
            "negative_prompt": "", "seed": 0, "controls": ["softedge"], "conditioning_scales": {"softedge": 1.0},
            "scheduler": "ddim", "num_inference_steps": 2, "guidance_scale": 7.0, "guidance_rescale": 0.0,
            "mode": "txt2img", "strength": 1.0, "models": {}, "lora_sha256": None, "token_sha256": None,
            "augmentation": augmentation}


def fabricate_step4(run_dir: Path, data_root: Path) -> list[dict]:
    """A Step 4 folder whose "synthetic" images are other real images of the source's class (the val/test
    images, so nothing is a copy of a training image), plus planted copies of training images (flipped,
    rotated) and a blank image."""
    step0 = run_dir / "step0_prepare"
    rows = read_jsonl(step0 / MANIFEST_FILE)
    names = list(yaml.safe_load((step0 / "yolo" / "data.yaml").read_text())["names"].values())
    train = sorted((r for r in rows if r["split"] == "train"), key=lambda r: r["id"])
    others = sorted((r for r in rows if r["split"] in ("val", "test")), key=lambda r: r["id"])
    step4 = run_dir / STEP4
    out = []
    for i, source in enumerate(train):
        same_class = [r for r in others if r["class"] == source["class"]]
        donor = same_class[i % len(same_class)]
        pixels = np.asarray(Image.open(data_root / donor["source"]).convert("L"))
        out.append(_synthetic_row(step4, f"{source['id']}-s000", source, pixels, names, "none"))
    for k, (tag, flip) in enumerate(PLANTED.items()):
        source = train[k]
        pixels = np.asarray(Image.open(data_root / source["source"]).convert("L"))
        pixels = {"hflip": pixels[:, ::-1], "rot90": np.rot90(pixels), None: np.full_like(pixels, 128)}[flip]
        out.append(_synthetic_row(step4, f"{source['id']}-{tag}", source, np.ascontiguousarray(pixels), names, "none"))
    out.sort(key=lambda r: r["name"])
    write_jsonl(step4 / MANIFEST_FILE, out)
    (step4 / "yolo" / "data.yaml").write_text(yaml.safe_dump({"train": "images", "val": "images", "nc": len(names), "names": dict(enumerate(names))}))
    write_json(step4 / "summary.json", {"step": STEP4, "status": "complete", "fingerprint": "fabricated"})
    return out


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> tuple[Path, dict]:
    """Step 0 (low-data protocol: half the training split held back), a fabricated Step 4, then Step 5."""
    from conftest import SAMPLE_ROOT, smoke_overrides

    from neu_det_pipeline.config import load_config
    from neu_det_pipeline.step0_prepare import STEP as STEP0
    from neu_det_pipeline.step5_evaluate import STEP as STEP5

    out = tmp_path_factory.mktemp("step5")
    config = load_config(SMOKE_CONFIG, [*smoke_overrides(tiny_models_dir, out), "data.train_fraction=0.5"])
    run_step(STEP0, config)
    fabricate_step4(out, SAMPLE_ROOT)
    return out, run_step(STEP5, config)


def test_curation_rejects_planted_copies_and_blank_with_reasons(evaluated: tuple[Path, dict]) -> None:
    out, summary = evaluated
    step5 = out / "step5_evaluate"
    rejections = {r["name"]: r for r in read_jsonl(step5 / "curated" / "rejections.jsonl")}
    planted = {name: r for name, r in rejections.items() if name.rsplit("-", 1)[-1] in ("copy", "blank")}
    assert {n.split("-", 1)[1] for n in planted} == {"hflip-copy", "rot90-copy", "blank"}
    by_tag = {n.split("-", 1)[1]: r for n, r in planted.items()}
    assert by_tag["hflip-copy"]["reason"] == "memorised" and "(hflip)" in by_tag["hflip-copy"]["detail"]
    assert by_tag["rot90-copy"]["reason"] == "memorised" and "rot" in by_tag["rot90-copy"]["detail"]
    assert by_tag["blank"]["reason"] == "degenerate"
    # The 1-epoch detector is far too weak for the label rule: it is skipped, and says why.
    assert summary["label_rule"].startswith("skipped: real-only detector mAP50")
    # Every other (real, non-copied) image is kept; the curated set is those Step 4 rows, unchanged.
    step4_rows = {r["name"]: r for r in read_jsonl(out / STEP4 / MANIFEST_FILE)}
    curated = read_jsonl(step5 / "curated" / MANIFEST_FILE)
    assert len(curated) + len(rejections) == len(step4_rows) and set(rejections) == set(planted)
    assert all(row == step4_rows[row["name"]] for row in curated)
    data = yaml.safe_load((step5 / "curated" / "yolo" / "data.yaml").read_text())
    step0_names = yaml.safe_load((out / "step0_prepare" / "yolo" / "data.yaml").read_text())["names"]
    assert data["names"] == step0_names
    assert sorted(p.stem for p in (step5 / "curated" / "yolo" / "images").iterdir()) == sorted(r["name"] for r in curated)


def test_utility_runs_write_map_and_oracle_gain(evaluated: tuple[Path, dict]) -> None:
    out, summary = evaluated
    metrics = read_json(out / "step5_evaluate" / "metrics.json")
    datasets = metrics["utility"]["datasets"]
    assert set(datasets) == {"real", "real+synthetic-1", "real+classical-1", "real+copy_paste-1", "oracle"}
    assert datasets["real"]["n_synthetic"] == 0 and datasets["oracle"]["n_real"] == 2 * datasets["real"]["n_real"]
    assert datasets["real+synthetic-1"]["n_synthetic"] == datasets["real"]["n_real"]  # ratio 1: as many as real
    # The control arms add as many images as the synthetic arm, made from the same real images (copy-paste skips a
    # class whose boxes leave no room: the sample's pitted-surface boxes cover whole images).
    assert datasets["real+classical-1"]["n_synthetic"] == datasets["real+synthetic-1"]["n_synthetic"]
    assert 0 < datasets["real+copy_paste-1"]["n_synthetic"] <= datasets["real+synthetic-1"]["n_synthetic"]
    for folder in ("classical-g0", "copy_paste-g0"):
        assert read_jsonl(out / "step5_evaluate" / "control_arms" / folder / MANIFEST_FILE)
    comparisons = metrics["utility"]["comparisons"]
    assert {"real+synthetic-1 vs real", "real+synthetic-1 vs real+classical-1", "real+synthetic-1 vs real+copy_paste-1"} <= set(comparisons)
    assert all(c["ci95"][0] <= c["difference"] <= c["ci95"][1] for c in comparisons.values())
    assert set(summary["synthetic_gain"]) == {"real", "real+classical-1", "real+copy_paste-1"}
    for run in metrics["utility"]["runs"]:
        assert 0 <= run["map50"] <= 1 and 0 <= run["map50_95"] <= run["map50"] + 1e-9
        assert (out / "step5_evaluate" / "utility" / run["weights"]).is_file()
    assert set(metrics["utility"]["gain_recovered"]) == {"real+synthetic-1", "real+classical-1", "real+copy_paste-1"}
    assert summary["map50"].keys() == datasets.keys()


def test_image_metrics_and_sample_sizes(evaluated: tuple[Path, dict]) -> None:
    out, _ = evaluated
    metrics = read_json(out / "step5_evaluate" / "metrics.json")
    for feature in ("clip", "dinov3"):
        overall = metrics["fidelity"][feature]["synthetic"]["all"]
        assert overall["n_real"] == 18 and overall["n_synth"] == 21
        assert overall["kid_subset_size"] <= 9 and overall["kid_std"] > 0
        per_class = metrics["fidelity"][feature]["synthetic"]["crazing"]
        assert not per_class["fid_reliable"] and any("biased" in note for note in per_class["notes"])
    rows = read_jsonl(out / "step5_evaluate" / "per_image.jsonl")
    blank = next(r for r in rows if r["name"].endswith("-blank"))
    assert not blank["kept"] and blank["reason"] == "degenerate"
    copy = next(r for r in rows if r["name"].endswith("-hflip-copy"))
    assert copy["copy_similarity"] > 0.99
    assert all(-1 <= r["edge_ssim_to_source"] <= 1 and r["lpips_to_source"] >= 0 and r["clip_score"] >= 0 for r in rows)
    # CLIP score and the CLIP feature space run the same model in the same dtype; LPIPS always in fp32.
    provenance = metrics["provenance"]
    assert provenance["clip_score"]["model"] == provenance["feature_spaces"]["clip"]["model"]
    assert provenance["clip_score"]["dtype"] == provenance["feature_spaces"]["clip"]["dtype"]
    assert provenance["lpips"]["dtype"] == "fp32"


class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.sources += [value for key, value in attrs if key in ("src", "href")]


def test_report_html_parses_and_references_only_existing_files(evaluated: tuple[Path, dict]) -> None:
    step5 = evaluated[0] / "step5_evaluate"
    parser = _References()
    parser.feed((step5 / "report.html").read_text())
    parser.close()
    assert parser.sources, "the report shows no figure"
    for source in parser.sources:
        assert "://" not in source and (step5 / source).is_file(), source
    markdown = (step5 / "report.md").read_text()
    assert "Downstream utility" in markdown and "Rejections by reason and class" in markdown


def test_rerun_is_up_to_date_and_resume_reuses_yolo_runs(evaluated: tuple[Path, dict], tiny_models_dir: Path) -> None:
    from conftest import smoke_overrides

    from neu_det_pipeline.config import load_config
    from neu_det_pipeline.step5_evaluate import STEP as STEP5

    out, _ = evaluated
    config = load_config(SMOKE_CONFIG, [*smoke_overrides(tiny_models_dir, out), "data.train_fraction=0.5"])
    assert run_step(STEP5, config).get("up_to_date")
    (out / "step5_evaluate" / "summary.json").unlink()  # an interrupted run: the YOLO runs finished
    resumed = run_step(STEP5, config)
    assert resumed["resumed"]
    runs = read_json(out / "step5_evaluate" / "metrics.json")["utility"]["runs"]
    assert runs and all(run["reused"] for run in runs)


def test_compare_two_runs(evaluated: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = evaluated
    other = tmp_path / "other"
    shutil.copytree(out, other, ignore=shutil.ignore_patterns("utility", "curated"))
    config_file = other / "step5_evaluate" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["evaluation"]["pr_neighbourhood"] = 5
    config_file.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "neu_det_pipeline.cli", "compare", str(out), str(other), "--out", str(tmp_path / "cmp")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "evaluation.pr_neighbourhood" in page and "mAP50" in page and str(other) in page
    assert "GPU-h" in page and "Cost per step" in page and "step5_evaluate" in page  # cost beside quality, per step


def test_missing_step4_output_names_the_step(tmp_path: Path, step0_sample_dir: Path, tiny_models_dir: Path) -> None:
    from conftest import smoke_overrides

    from neu_det_pipeline.config import load_config
    from neu_det_pipeline.step5_evaluate import STEP as STEP5

    shutil.copytree(step0_sample_dir / "step0_prepare", tmp_path / "step0_prepare")
    config = load_config(SMOKE_CONFIG, smoke_overrides(tiny_models_dir, tmp_path))
    with pytest.raises(MissingStepOutputError, match="step4_generate"):
        run_step(STEP5, config)
