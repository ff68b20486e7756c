"""Pictures and tables people look at before reading numbers."""

from __future__ import annotations

from collections import Counter, defaultdict

from PIL import Image, ImageDraw, ImageFont
from rich.table import Table

from neu_det_pipeline.data.neu_det import Sample

# Distinct colours for up to 10 classes (tab10).
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def class_stats(samples: list[Sample], classes: list[str]) -> dict[str, dict[str, float]]:
    """Per class: images, boxes (by box label), boxes per image, mean box area, boxes labelled with another class."""
    images = Counter(s.image_class for s in samples)
    boxes = Counter(b.label for s in samples for b in s.boxes)
    area: dict[str, float] = defaultdict(float)
    other = Counter()
    boxes_in_images = Counter()
    for s in samples:
        boxes_in_images[s.image_class] += len(s.boxes)
        for b in s.boxes:
            area[b.label] += (b.xmax - b.xmin) * (b.ymax - b.ymin) / (s.width * s.height)
            other[s.image_class] += b.label != s.image_class
    return {
        name: {
            "images": images[name],
            "boxes": boxes[name],
            "boxes_per_image": round(boxes_in_images[name] / images[name], 3) if images[name] else 0.0,
            "mean_box_area": round(area[name] / boxes[name], 4) if boxes[name] else 0.0,
            "boxes_of_other_class": other[name],
        }
        for name in classes
    }


def stats_table(stats: dict[str, dict[str, float]], split_counts: dict[str, Counter]) -> Table:
    table = Table(title="NEU-DET classes", title_justify="left")
    columns = ["class", "images", *split_counts, "boxes", "boxes/image", "mean box area", "boxes of other class"]
    for column in columns:
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, row in stats.items():
        per_split = [str(split_counts[split][name]) for split in split_counts]
        table.add_row(
            name, str(row["images"]), *per_split, str(row["boxes"]), f"{row['boxes_per_image']:.2f}",
            f"{row['mean_box_area']:.1%}", str(row["boxes_of_other_class"]),
        )
    return table


def contact_sheet(samples_by_class: dict[str, list[Sample]], classes: list[str], tile: int = 200) -> Image.Image:
    """One row per class: samples with their boxes drawn in the box class's colour."""
    label_width = 140
    columns = max((len(v) for v in samples_by_class.values()), default=1)
    sheet = Image.new("RGB", (label_width + columns * tile, len(classes) * tile), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=14)
    for row, name in enumerate(classes):
        top = row * tile
        draw.text((6, top + tile // 2 - 8), name, fill=PALETTE[row % len(PALETTE)], font=font)
        for col, sample in enumerate(samples_by_class.get(name, [])):
            with Image.open(sample.image_path) as source:
                image = source.convert("RGB")
            scale_x, scale_y = tile / sample.width, tile / sample.height
            image = image.resize((tile, tile), Image.Resampling.BILINEAR)
            tile_draw = ImageDraw.Draw(image)
            for box in sample.boxes:
                colour = PALETTE[classes.index(box.label) % len(PALETTE)]
                rect = (box.xmin * scale_x, box.ymin * scale_y, box.xmax * scale_x - 1, box.ymax * scale_y - 1)
                tile_draw.rectangle(rect, outline=colour, width=2)
                label_box = tile_draw.textbbox((rect[0] + 3, rect[1] + 2), box.label, font=font)
                tile_draw.rectangle(label_box, fill=colour)
                tile_draw.text((rect[0] + 3, rect[1] + 2), box.label, fill="white", font=font)
            sheet.paste(image, (label_width + col * tile, top))
    return sheet

