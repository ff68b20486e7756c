"""How reports look to a reader: every table scrolls in its own box (a wide one never widens the page), figures sit
in a wrapping row, and contact sheets label their columns and rows (Step 4: real, each control map, synthetic)."""

from __future__ import annotations

import io
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from PIL import Image

from neu_det_pipeline.evaluation.report import (
    HTML_STYLE,
    KEPT_COLOUR,
    REJECTED_COLOUR,
    Section,
    Table,
    Tile,
    console_tables,
    labelled_sheet,
    render_html,
)
from neu_det_pipeline.generation.outputs import SHEET_TILE, contact_sheet


class _Nesting(HTMLParser):
    """Each <table>'s and <figure>'s enclosing element classes."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, str]] = []
        self.tables: list[list[str]] = []
        self.figures: list[list[str]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        classes = [cls for cls in (dict(attrs).get("class") or "").split()]
        if tag == "table":
            self.tables.append([c for _, c in self.stack])
        if tag == "figure":
            self.figures.append([c for _, c in self.stack])
        self.stack.append((tag, " ".join(classes)))

    def handle_endtag(self, tag: str) -> None:
        while self.stack and self.stack.pop()[0] != tag:
            pass


def test_every_table_scrolls_in_its_own_box() -> None:
    wide = Table([f"column {i}" for i in range(40)], [[f"{i * j:.4f}" for i in range(40)] for j in range(3)], "wide")
    page = render_html("layout", [Section("one", ["text"], [wide, Table(["a", "b"], [["1", "2"]])], [("x.png", "x"), ("y.png", "y")])])
    nesting = _Nesting()
    nesting.feed(page)
    assert len(nesting.tables) == 2 and all(parents[-1] == "scroll" for parents in nesting.tables)
    assert len(nesting.figures) == 2 and all(parents[-1] == "figures" for parents in nesting.figures)
    assert ".scroll{overflow-x:auto" in HTML_STYLE and "max-width:100%" in HTML_STYLE


def _dark_columns(strip: np.ndarray) -> np.ndarray:
    """x positions where a strip holds text (black, antialiased: every channel dark; the red boxes are not)."""
    return np.flatnonzero((strip.max(axis=2) < 100).any(axis=0))


def test_step4_contact_sheet_labels_columns_and_rows(tmp_path: Path) -> None:
    def png(name: str, value: int) -> Path:
        path = tmp_path / name
        Image.fromarray(np.full((40, 40), value, np.uint8)).save(path)
        return path

    rows = [{"source": src, "name": f"{src}-s{i:03d}", "class": "crazing", "file": png(f"{src}-{i}.png", 200).name,
             "boxes": [{"label": "crazing", "xmin": 5, "ymin": 5, "xmax": 30, "ymax": 30}]} for src in ("crazing_1", "crazing_2") for i in range(2)]
    maps = {src: {"softedge": png(f"{src}-edge.png", 230), "depth": png(f"{src}-depth.png", 240)} for src in ("crazing_1", "crazing_2")}
    sources = {src: png(f"{src}.png", 220) for src in ("crazing_1", "crazing_2")}
    sheet = np.asarray(contact_sheet(rows, tmp_path, sources, maps))
    # Five columns (real, depth map, softedge map, synthetic 1, synthetic 2) right of the row labels, two rows.
    pitch = SHEET_TILE + 4
    label_width = sheet.shape[1] - 5 * pitch
    assert 40 < label_width < 160  # as wide as the source ids need
    tiles_top = sheet.shape[0] - 2 * (SHEET_TILE + 15 + 3 + 4)
    header = sheet[tiles_top - 36 : tiles_top]  # the column labels' two lines, under the title
    for column in range(5):
        left = label_width + column * pitch
        assert _dark_columns(header[:, left : left + SHEET_TILE]).size, f"column {column} has no label"
    for row in range(2):
        top = tiles_top + row * (SHEET_TILE + 22)
        assert _dark_columns(sheet[top : top + SHEET_TILE, :label_width]).size, f"row {row} has no source label"
        # a synthetic tile's caption under it (its name after the source id)
        caption = sheet[top + SHEET_TILE + 2 : top + SHEET_TILE + 18, label_width + 3 * pitch : label_width + 4 * pitch]
        assert _dark_columns(caption).size


def test_kept_and_rejected_tiles_are_framed_in_their_colour() -> None:
    gray = np.full((16, 16), 128, np.uint8)
    sheet = labelled_sheet([("a", [Tile(gray, "kept", KEPT_COLOUR), None]), ("b", [None, Tile(gray, "memorised", REJECTED_COLOUR)])],
                           ["synthetic: kept", "synthetic: rejected"], tile=64)
    colours = {tuple(int(KEPT_COLOUR[i : i + 2], 16) for i in (1, 3, 5)), tuple(int(REJECTED_COLOUR[i : i + 2], 16) for i in (1, 3, 5))}
    assert colours <= {colour for _, colour in sheet.getcolors(1 << 16)}


def test_compare_console_tables_fit_the_terminal_one_row_per_experiment() -> None:
    from rich.console import Console

    header = ["experiment", *(f"quality metric {i}" for i in range(8)), "wall time", "GPU-h", "peak GPU memory"]
    rows = [[name, *(f"0.{i}123 ± 0.0456" for i in range(8)), "3.20 h", "2.512", "41.3 GiB"] for name in ("baseline", "exp_a_blip2_unipc")]
    tables = console_tables(Table(header, rows), 80, {"quality and utility": range(1, 9), "cost": range(9, 12)})
    console = Console(width=80, record=True, file=io.StringIO())
    for table in tables:
        console.print(table)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert len(tables) > 2 and tables[-1].title == "cost"  # quality split over several tables, cost kept together
    assert all(t.columns[0].header == "experiment" and t.row_count == 2 for t in tables)
    for value in ("0.7123 ± 0.0456", "exp_a_blip2_unipc", "41.3 GiB"):
        assert value in text  # on one line, uncut
