"""Reports people read: `report.md` and a self-contained `report.html` (images as relative files beside it,
no script, no network) rendered from one list of sections, plus the plots and contact sheets they show."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from neu_det_pipeline.io import atomic_write_text, save_image

FIGURES_DIR = "report"
HTML_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%;border:1px solid #ddd}
.note{color:#666;font-size:.9em}"""


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
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        for path, caption in section.images:
            parts.append(f"<figure><img src='{e(path)}' alt='{e(caption)}'><figcaption class='note'>{e(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_reports(out_dir: Path, title: str, sections: list[Section], stem: str = "report") -> None:
    atomic_write_text(out_dir / f"{stem}.md", render_markdown(title, sections))
    atomic_write_text(out_dir / f"{stem}.html", render_html(title, sections))


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


def image_grid(rows: list[tuple[str, list[np.ndarray], list[str]]], tile: int = 128) -> Image.Image:
    """One labelled row per entry: (row label, grayscale images, caption per image)."""
    label_width = 160
    columns = max((len(images) for _, images, _ in rows), default=1)
    sheet = Image.new("RGB", (label_width + columns * tile, len(rows) * (tile + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    for r, (label, images, captions) in enumerate(rows):
        top = r * (tile + 16)
        draw.text((6, top + tile // 2), label, fill="black", font=font)
        for c, (pixels, caption) in enumerate(zip(images, captions)):
            sheet.paste(Image.fromarray(pixels).resize((tile, tile)).convert("RGB"), (label_width + c * tile, top))
            draw.text((label_width + c * tile + 2, top + tile + 1), caption[:22], fill="#555", font=font)
    return sheet


# ------------------------------------------------------------------------------------ metric sections


def fidelity_sections(metrics: dict[str, Any], figures: Path, prefix: str) -> list[Section]:
    """Sections for what :meth:`MetricSuite.compare` returns; heatmaps are written under `figures`."""
    classes = metrics["lbp"]["classes"]
    sizes = metrics["sample_sizes"]
    sections = [Section("Sample sizes", tables=[Table(["class", *sizes], [[c, *(str(sizes[k].get(c, 0)) for k in sizes)] for c in classes])])]
    for feature, comparisons in metrics["fidelity"].items():
        tables = []
        for key, by_class in comparisons.items():
            rows = []
            for name, m in by_class.items():
                fid = fmt(m["fid"], 2) + ("" if m["fid_reliable"] or m["fid"] is None else " (n < dim)")
                kid = "—" if m["kid_mean"] is None else f"{fmt(m['kid_mean'])} ± {fmt(m['kid_std'])} (subsets of {m['kid_subset_size']})"
                rows.append([name, str(m["n_real"]), str(m["n_synth"]), kid, fid, fmt(m["precision"], 3), fmt(m["recall"], 3)])
            tables.append(Table(["class", "n real", f"n {key}", "KID mean ± std", "FID", "precision", "recall"], rows, f"{key} vs real ({feature} features)"))
        notes = sorted({n for m in comparisons.get("synthetic", {}).values() for n in m["notes"]})
        text = ["KID first: it is unbiased at small sample sizes. FID marked (n < dim) rests on fewer images than "
                "feature dimensions and is biased upward. Precision = realism, recall = coverage (k-NN manifolds)."]
        sections.append(Section(f"Fidelity and diversity in {feature} space", text + notes, tables))
    lp = metrics["lpips"]
    rows = [[c, fmt(lp["diversity"]["real"].get(c)), fmt(lp["diversity"]["synthetic"].get(c)), fmt(lp["nearest_real"].get(c))] for c in [*classes, "all"]]
    sections.append(Section(
        f"LPIPS ({lp['net']}{'' if lp['pretrained_backbone'] else ', random backbone: offline test only'})",
        ["Diversity: mean LPIPS of random same-class pairs (synthetic close to real is good; far below real means "
         "mode collapse). Nearest real: each synthetic image's LPIPS to its nearest real training image (low: a near-copy)."],
        [Table(["class", "diversity real", "diversity synthetic", "to nearest real"], rows)],
    ))
    images = []
    for key, matrix in metrics["lbp"].items():
        if key.endswith("_vs_real"):
            path = figures / f"{prefix}lbp_{key}.png"
            heatmap(matrix, classes, f"LBP texture similarity: {key.replace('_', ' ')}", path)
            images.append((path.relative_to(figures.parent).as_posix(), f"{key.replace('_', ' ')}: rows compared class, columns real class; the row maximum in red"))
    sections.append(Section(f"LBP texture (uniform, radii {metrics['lbp']['radii']})",
                            ["Similarity = 1 - chi-square distance of class-mean LBP histograms. A row whose maximum is off the "
                             "diagonal is a class whose texture drifts toward another."], images=images))
    return sections
