"""Reports people read: `report.md` and a self-contained `report.html` (images as relative files beside it,
no script, no network) rendered from one list of sections, plus the plots and contact sheets they show.

Read at any window width: each table sits in its own horizontally scrolling box (its first column stays in view),
so a wide table never widens the page; a section's figures wrap side by side. Contact sheets read on their own: a
title, a label over each column, a label left of each row, a caption under each tile (:func:`labelled_sheet`).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from rich.table import Table as RichTable

from neu_det_pipeline.io import atomic_write_text, save_image

FIGURES_DIR = "report"
HTML_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
p{overflow-wrap:anywhere}.scroll{overflow-x:auto;max-width:100%;margin:.5em 0 1.5em}
table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left;position:sticky;left:0;background:#fff}th,th:first-child{background:#f3f3f3}
.figures{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}figure{margin:0;max-width:100%}
figcaption{width:0;min-width:100%}
img{max-width:100%;border:1px solid #ddd}.note{color:#666;font-size:.9em}"""
MAX_LABEL_WIDTH = 200
CAPTION_COLOUR = "#555555"
KEPT_COLOUR = "#1a7f37"
REJECTED_COLOUR = "#c62828"


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    title: str = ""


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    images: list[tuple[str, str]] = field(default_factory=list)
    """(path relative to the report, caption)."""


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.2e}" if value and abs(value) < 1e-3 else f"{value:.{digits}f}"
    return str(value)


def render_markdown(title: str, sections: list[Section]) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for paragraph in section.text:
            lines += [paragraph, ""]
        for table in section.tables:
            if table.title:
                lines += [f"**{table.title}**", ""]
            lines.append("| " + " | ".join(table.header) + " |")
            lines.append("|" + "---|" * len(table.header))
            lines += ["| " + " | ".join(row) + " |" for row in table.rows]
            lines.append("")
        for path, caption in section.images:
            lines += [f"![{caption}]({path})", ""]
    return "\n".join(lines)


def render_html(title: str, sections: list[Section]) -> str:
    e = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{HTML_STYLE}</style></head><body>",
             f"<h1>{e(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{e(section.title)}</h2>")
        parts += [f"<p>{e(paragraph)}</p>" for paragraph in section.text]
        for table in section.tables:
            if table.title:
                parts.append(f"<h3>{e(table.title)}</h3>")
            head = "".join(f"<th>{e(h)}</th>" for h in table.header)
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in table.rows)
            parts.append(f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")
        if section.images:
            parts.append("<div class='figures'>" + "".join(
                f"<figure><img src='{e(path)}' alt='{e(caption)}'><figcaption class='note'>{e(caption)}</figcaption></figure>"
                for path, caption in section.images) + "</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_reports(out_dir: Path, title: str, sections: list[Section], stem: str = "report") -> None:
    atomic_write_text(out_dir / f"{stem}.md", render_markdown(title, sections))
    atomic_write_text(out_dir / f"{stem}.html", render_html(title, sections))


def console_tables(table: Table, width: int, parts: dict[str, range]) -> list[RichTable]:
    """`table` for a terminal `width` wide: each of `parts` (title -> its column indices) over as few tables as fit,
    each starting with the table's first column (the row's name), so a row stays one row and no value is cut or wrapped."""
    def needed(i: int) -> int:  # cells on one line; a header may wrap at its spaces
        longest_word = max(len(word) for word in table.header[i].split() or [""])
        return max([longest_word, *(len(row[i]) for row in table.rows)]) + 3

    groups: list[tuple[str, list[int]]] = []
    for title, columns in parts.items():
        start = len(groups)
        used = width
        for i in columns:
            if used + needed(i) > width:
                groups.append((title, []))
                used = needed(0) + 1
            groups[-1][1].append(i)
            used += needed(i)
        if len(groups) - start > 1:
            groups[start:] = [(f"{title} ({n}/{len(groups) - start})", group) for n, (_, group) in enumerate(groups[start:], 1)]
    tables = []
    for title, columns in groups:
        part = RichTable(title=title, title_justify="left")
        for i in (0, *columns):
            part.add_column(table.header[i], width=needed(i) - 3)
        for row in table.rows:
            part.add_row(*(row[i] for i in (0, *columns)))
        tables.append(part)
    return tables


# ----------------------------------------------------------------------------------------- figures


def _figure_to_file(figure: Any, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    buffer.seek(0)
    save_image(Image.open(buffer).convert("RGB"), path)


def heatmap(matrix: list[list[float | None]], classes: list[str], title: str, path: Path) -> None:
    """Class-by-class similarity; rows synthetic (or compared) classes, columns real classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    figure, axes = plt.subplots(figsize=(1.1 * len(classes) + 2, 0.9 * len(classes) + 1.5))
    image = axes.imshow(values, cmap="viridis")
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("real class")
    axes.set_title(title)
    for i, row in enumerate(values):
        best = np.nanargmax(row) if not np.isnan(row).all() else None
        for j, value in enumerate(row):
            if not np.isnan(value):
                axes.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=7,
                          color="red" if j == best else "white", fontweight="bold" if j == best else "normal")
    figure.colorbar(image)
    _figure_to_file(figure, path)


def bar_chart(labels: list[str], means: list[float], stds: list[float], ylabel: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(max(4, 1.2 * len(labels) + 1), 3.5))
    axes.bar(range(len(labels)), means, yerr=stds, capsize=4, color="#1f77b4")
    axes.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    _figure_to_file(figure, path)


@dataclass
class Tile:
    """One picture of a contact sheet."""

    image: np.ndarray | Image.Image
    caption: str = ""
    colour: str = CAPTION_COLOUR
    """The caption's colour; any other than the default also frames the tile (kept green, rejected red)."""


def labelled_sheet(rows: list[tuple[str, list[Tile | None]]], columns: list[str] | None = None, title: str = "",
                   tile: int = 128) -> Image.Image:
    """A contact sheet that reads on its own: `title` on top, `columns` labelled over the tiles, each row's label on
    its left (as wide as the longest, up to MAX_LABEL_WIDTH), each tile's caption under it; a `None` tile leaves its
    cell empty."""
    font = ImageFont.load_default(size=12)
    line = 15
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = math.ceil(min(MAX_LABEL_WIDTH, 12 + max([measure.textlength(label, font=font) for label, _ in rows] + [0.0])))
    n_columns = max([len(columns or [])] + [len(tiles) for _, tiles in rows] + [1])
    caption_height = line + 3 if any(t and t.caption for _, tiles in rows for t in tiles) else 0
    width = label_width + n_columns * (tile + 4)
    title_lines = _wrap(measure, title, font, width - 12, 3) if title else []
    title_height = len(title_lines) * line + 6 if title else 0
    header_height = 2 * line + 6 if columns else 0
    row_height = tile + caption_height + 4
    sheet = Image.new("RGB", (width, title_height + header_height + len(rows) * row_height), "white")
    draw = ImageDraw.Draw(sheet)
    for i, text in enumerate(title_lines):
        draw.text((6, 3 + i * line), text, fill="black", font=font)
    for c, label in enumerate(columns or []):
        for i, text in enumerate(_wrap(draw, label, font, tile, 2)):
            left = label_width + c * (tile + 4) + (tile - draw.textlength(text, font=font)) / 2
            draw.text((left, title_height + 3 + i * line), text, fill="black", font=font)
    for r, (label, tiles) in enumerate(rows):
        top = title_height + header_height + r * row_height
        for i, text in enumerate(_wrap(draw, label, font, label_width - 10, 3)):
            draw.text((6, top + tile // 2 - line + i * line), text, fill="black", font=font)
        for c, cell in enumerate(tiles):
            if cell is None:
                continue
            left = label_width + c * (tile + 4)
            image = cell.image if isinstance(cell.image, Image.Image) else Image.fromarray(cell.image)
            sheet.paste(image.convert("RGB").resize((tile, tile)), (left, top))
            if cell.colour != CAPTION_COLOUR:
                draw.rectangle([left - 2, top - 2, left + tile + 1, top + tile + 1], outline=cell.colour, width=2)
            if cell.caption:
                draw.text((left + 1, top + tile + 3), _wrap(draw, cell.caption, font, tile - 2, 1)[0], fill=cell.colour, font=font)
    return sheet


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: float, max_lines: int) -> list[str]:
    """`text` in at most `max_lines` lines of at most `width` pixels, words kept whole where they fit, the end cut with …."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [" ".join(lines[max_lines - 1 :])]
    fitted = []
    for text_line in lines or [""]:
        if draw.textlength(text_line, font=font) > width:
            while text_line and draw.textlength(text_line + "…", font=font) > width:
                text_line = text_line[:-1]
            text_line += "…"
        fitted.append(text_line)
    return fitted


def image_grid(rows: list[tuple[str, list[np.ndarray], list[str]]], tile: int = 128, columns: list[str] | None = None,
               title: str = "") -> Image.Image:
    """One labelled row per entry: (row label, grayscale images, caption per image); see :func:`labelled_sheet`."""
    return labelled_sheet([(label, [Tile(pixels, caption) for pixels, caption in zip(images, captions)]) for label, images, captions in rows],
                          columns, title, tile)


# ------------------------------------------------------------------------------------ metric sections


METRIC_DEFINITIONS = [
    ["KID", "Kernel Inception Distance (Binkowski et al. 2018): unbiased squared MMD between real and synthetic features "
            "with the cubic polynomial kernel, mean ± std over random subsets (torchmetrics)"],
    ["FID", "Fréchet distance between Gaussians fitted to real and synthetic features (Heusel et al. 2017; torchmetrics); "
            "biased upward when a side has fewer images than feature dimensions"],
    ["precision / recall", "Kynkäänniemi et al. 2019 (torch-fidelity): share of synthetic images inside the real k-NN "
                           "manifold (realism) / of real images inside the synthetic one (coverage)"],
    ["LPIPS diversity", "mean LPIPS (Zhang et al. 2018, lpips package) over random same-class pairs of one side"],
    ["LPIPS to nearest real", "each synthetic image's LPIPS to the nearest real training image of its class, searched "
                              "among the real images nearest in the first feature space (evaluation.lpips_candidates)"],
    ["IC-LPIPS", "intra-cluster LPIPS (Ojha et al. 2021; DFMGAN, AnomalyDiffusion): each synthetic image joins the cluster "
                 "of its LPIPS-nearest real image of its class (as above); mean pairwise LPIPS among up to "
                 "evaluation.ic_lpips_cluster_size members of each cluster with 2 or more, averaged over clusters; the "
                 "overall value is the mean over classes. Exactly the papers' assignment when a class has at most "
                 "evaluation.lpips_candidates real images (their few-shot setting)"],
    ["in-box KID, LPIPS", "the same metrics on the defect boxes: each box cropped from the 200 px image and resized to "
                          "evaluation.box_crop_size px (bicubic), grouped by the box's label; KID in the first feature space"],
    ["LBP texture similarity", "1 - symmetric chi-square distance of class-mean uniform-LBP histograms (scikit-image)"],
]


def _provenance_section(metrics: dict[str, Any]) -> Section:
    """What a reader needs to compare these numbers with published ones."""
    provenance = metrics.get("provenance") or {}
    versions = provenance.get("versions", {})
    spaces = provenance.get("feature_spaces", {})
    lp = provenance.get("lpips", {})
    tables = [Table(["metric", "definition"], METRIC_DEFINITIONS, "Definitions"),
              Table(["library", "version"], [[name, fmt(v)] for name, v in versions.items()], "Library versions")]
    if spaces:
        tables.append(Table(["feature space", "model", "weights", "input size (px)", "dim", "dtype"],
                            [[name, str(d["model"]), str(d["weights"]), str(d["input_size"]), str(d["dim"]), d["dtype"]] for name, d in spaces.items()],
                            "Feature extractors"))
    text = [f"Images are compared at {provenance.get('image_side', 200)} px grayscale (replicated to RGB for the networks), "
            "which resize them to their input size. Images per class on each side: the sample-size table."]
    if lp:
        text.append(f"LPIPS: {lp['net']}, backbone {lp['backbone']}, linear layers {lp['linear_layers']}; fed "
                    f"{lp['input_size']['whole_image']} px whole images and {lp['input_size']['box_crop']} px box crops.")
    return Section("Metric definitions and provenance", text, tables)


def fidelity_sections(metrics: dict[str, Any], figures: Path, prefix: str) -> list[Section]:
    """Sections for what :meth:`MetricSuite.compare` returns; heatmaps are written under `figures`."""
    classes = metrics["lbp"]["classes"]
    sizes = metrics["sample_sizes"]
    sections = []
    if metrics.get("not_computed"):
        sections.append(Section("Metrics not computed", ["Each metric below was left out; the others ran."],
                                [Table(["metric", "why, and the fix"], [[e["metric"], e["why"]] for e in metrics["not_computed"]])]))
    in_box = metrics.get("in_box")
    size_header, size_rows = ["class", *sizes], [[c, *(str(sizes[k].get(c, 0)) for k in sizes)] for c in classes]
    if in_box:
        size_header += ["boxes real", "boxes synthetic"]
        size_rows = [[*row, str(in_box["boxes"]["real"].get(c, 0)), str(in_box["boxes"]["synthetic"].get(c, 0))] for row, c in zip(size_rows, classes)]
    sections.append(Section("Sample sizes", tables=[Table(size_header, size_rows)]))
    for feature, comparisons in metrics["fidelity"].items():
        tables = [_distribution_table(by_class, key, f"{key} vs real ({feature} features)") for key, by_class in comparisons.items()]
        notes = sorted({n for m in comparisons.get("synthetic", {}).values() for n in m["notes"]})
        text = ["KID first: it is unbiased at small sample sizes. FID marked (n < dim) rests on fewer images than "
                "feature dimensions and is biased upward. Precision = realism, recall = coverage (k-NN manifolds)."]
        sections.append(Section(f"Fidelity and diversity in {feature} space", text + notes, tables))
    lp = metrics["lpips"]
    if lp["diversity"] is not None:
        ic = (lp.get("ic_lpips") or {}).get("value", {})
        clusters = (lp.get("ic_lpips") or {}).get("clusters", {})
        nearest = lp["nearest_real"] or {}
        rows = [[c, fmt(lp["diversity"]["real"].get(c)), fmt(lp["diversity"]["synthetic"].get(c)), fmt(nearest.get(c)), fmt(ic.get(c)),
                 "/".join(map(str, clusters[c])) if c in clusters else "—"] for c in [*classes, "all"]]
        sections.append(Section(
            f"LPIPS ({lp['net']}{'' if lp['pretrained_backbone'] else ', random backbone: offline test only'})",
            ["Diversity: mean LPIPS of random same-class pairs (synthetic close to real is good; far below real means "
             "mode collapse). Nearest real: each synthetic image's LPIPS to its nearest real training image of its class "
             "(low: a near-copy). IC-LPIPS: mean pairwise LPIPS inside the clusters of synthetic images around each real "
             "image (higher: more varied; near 0: one image per cluster), see Definitions."],
            [Table(["class", "diversity real", "diversity synthetic", "to nearest real", "IC-LPIPS", "clusters scored / formed"], rows)],
        ))
    if in_box and (in_box["fidelity"] or in_box["lpips"]):
        tables = []
        if in_box["fidelity"]:
            tables.append(_distribution_table(in_box["fidelity"], "synthetic", f"box crops, synthetic vs real ({in_box['feature_space']} features)", "boxes"))
        if in_box["lpips"]:
            box_lp = in_box["lpips"]
            ic = (box_lp.get("ic_lpips") or {}).get("value", {})
            tables.append(Table(["box label", "diversity real", "diversity synthetic", "IC-LPIPS"],
                                [[c, fmt(box_lp["diversity"]["real"].get(c)), fmt(box_lp["diversity"]["synthetic"].get(c)), fmt(ic.get(c))]
                                 for c in [*classes, "all"]], "LPIPS on box crops"))
        sections.append(Section(f"Inside the boxes ({in_box['crop_size']} px crops)",
                                ["The defect itself rather than the background texture: every box cropped and resized, grouped by "
                                 "its label."], tables))
    images = []
    for key, matrix in metrics["lbp"].items():
        if key.endswith("_vs_real"):
            path = figures / f"{prefix}lbp_{key}.png"
            heatmap(matrix, classes, f"LBP texture similarity: {key.replace('_', ' ')}", path)
            images.append((path.relative_to(figures.parent).as_posix(), f"{key.replace('_', ' ')}: rows compared class, columns real class; the row maximum in red"))
    sections.append(Section(f"LBP texture (uniform, radii {metrics['lbp']['radii']})",
                            ["Similarity = 1 - chi-square distance of class-mean LBP histograms. A row whose maximum is off the "
                             "diagonal is a class whose texture drifts toward another."], images=images))
    sections.append(_provenance_section(metrics))
    return sections


def _distribution_table(by_class: dict[str, Any], key: str, title: str, unit: str = "") -> Table:
    rows = []
    for name, m in by_class.items():
        fid = fmt(m["fid"], 2) + ("" if m["fid_reliable"] or m["fid"] is None else " (n < dim)")
        kid = "—" if m["kid_mean"] is None else f"{fmt(m['kid_mean'])} ± {fmt(m['kid_std'])} (subsets of {m['kid_subset_size']})"
        rows.append([name, str(m["n_real"]), str(m["n_synth"]), kid, fid, fmt(m["precision"], 3), fmt(m["recall"], 3)])
    return Table(["class", f"n real {unit}".strip(), f"n {key} {unit}".strip(), "KID mean ± std", "FID", "precision", "recall"], rows, title)


def score_strips(scores: dict[str, list[float]], dropped: dict[str, dict[str, list[bool]]], title: str, path: Path) -> None:
    """Per class, every image's distribution score as a dot (jittered); marked where a `keep` threshold drops it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(scores)
    figure, axes = plt.subplots(figsize=(max(5, 1.3 * len(classes) + 1.5), 3.8))
    rng = np.random.default_rng(0)
    markers = {"top_k": ("x", "#d62728"), "top_p": ("+", "#ff7f0e")}
    labelled: set[str] = set()
    for i, name in enumerate(classes):
        values = np.asarray(scores[name], float)
        x = i + rng.uniform(-0.25, 0.25, len(values))
        axes.scatter(x, values, s=12, color="#1f77b4", alpha=0.7, label="image" if i == 0 else None)
        for policy, (marker, color) in markers.items():
            drop = np.asarray(dropped[policy][name], bool)
            if drop.any():
                label = None if policy in labelled else f"dropped by {policy}"
                labelled.add(policy)
                axes.scatter(x[drop], values[drop], s=40, marker=marker, color=color, label=label)
    axes.set_xticks(range(len(classes)), classes, rotation=20, ha="right")
    axes.set_ylabel("distance to the real class")
    axes.set_title(title)
    axes.legend(fontsize=7, loc="upper right")
    _figure_to_file(figure, path)
