"""Draws a run report as an image with PIL only (ComfyUI ships Pillow, not matplotlib).

``render_report`` takes a RunReport (or its ``to_dict()``) and draws, per layer and head: the kept
fraction, the key cluster counts, which layers ran dense, and the time per layer with its clustering
share. ``render_reports`` stacks several reports (one per method) into one image, with one colour scale
and one bar height per quantity for all of them, so methods compare by eye. ``render_tradeoff`` draws
error against kept fraction for every method. Bar and scatter axes start at a labelled 0.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

WIDTH = 1200
MARGIN = 16
PANEL_GAP = 24
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GRID = (205, 205, 205)
DENSE_FILL = (150, 150, 150)
TIME_COLOR = (70, 130, 180)
CLUSTERING_COLOR = (230, 140, 40)
ERROR_COLOR = (190, 60, 60)
# Marker colours of the methods in the error / kept fraction panel (cycled).
METHOD_COLORS = ((40, 40, 40), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                 (140, 86, 75), (227, 119, 194))
# Anchor colours of a perceptually ordered map (dark blue -> green -> yellow), interpolated linearly.
COLOR_MAP = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def color_of(value: float, low: float, high: float) -> tuple:
    """Colour of ``value`` on the map between ``low`` and ``high`` (grey for missing values)."""
    if value is None or not math.isfinite(value):
        return DENSE_FILL
    t = 0.0 if high <= low else min(1.0, max(0.0, (value - low) / (high - low)))
    position = t * (len(COLOR_MAP) - 1)
    i = min(int(position), len(COLOR_MAP) - 2)
    frac = position - i
    return tuple(int(round(a + (b - a) * frac)) for a, b in zip(COLOR_MAP[i], COLOR_MAP[i + 1]))


def _as_dict(report) -> dict:
    if hasattr(report, "to_dict"):
        report = report.to_dict()
    if not isinstance(report, Mapping) or "layers" not in report:
        raise ValueError("render_report expects a RunReport or its to_dict() mapping with a 'layers' list")
    return dict(report)


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


class _Panel:
    """A titled rectangle on the canvas with helpers for axes and labels."""

    def __init__(self, draw, box, title, font, small):
        self.draw, self.font, self.small = draw, font, small
        x0, y0, x1, y1 = box
        draw.text((x0, y0), title, fill=INK, font=font)
        self.x0, self.y0, self.x1, self.y1 = x0 + 44, y0 + 22, x1, y1 - 18

    @property
    def width(self):
        return self.x1 - self.x0

    @property
    def height(self):
        return self.y1 - self.y0


def _heatmap(panel: _Panel, rows: list, columns: int, low: float, high: float, fmt: str, row_labels,
             dense_rows: set, legend: str) -> None:
    """rows[i][j] values (None = missing); dense rows are drawn grey with the word "dense"."""
    draw = panel.draw
    n_rows = max(1, len(rows))
    columns = max(1, columns)
    legend_width = 60
    cell_w = max(1.0, (panel.width - legend_width) / columns)
    cell_h = max(1.0, panel.height / n_rows)
    show_values = cell_w >= 34 and cell_h >= 13
    for i, row in enumerate(rows):
        top = panel.y0 + i * cell_h
        for j in range(columns):
            value = row[j] if j < len(row) else None
            left = panel.x0 + j * cell_w
            box = (left, top, left + cell_w - 1, top + cell_h - 1)
            dense = row_labels[i] in dense_rows
            draw.rectangle(box, fill=DENSE_FILL if dense else color_of(value, low, high))
            if show_values and not dense and value is not None and math.isfinite(value):
                text = format(value, fmt)
                bright = sum(color_of(value, low, high)) > 420
                draw.text((left + 3, top + (cell_h - 11) / 2), text, fill=INK if bright else (255, 255, 255),
                          font=panel.small)
        if dense_rows and row_labels[i] in dense_rows and cell_h >= 11:
            draw.text((panel.x0 + 3, top + (cell_h - 11) / 2), "dense", fill=(255, 255, 255), font=panel.small)
        if cell_h >= 10 or i % max(1, int(10 / cell_h)) == 0:
            draw.text((panel.x0 - 40, top + (cell_h - 11) / 2), f"L{row_labels[i]}", fill=INK, font=panel.small)
    step = max(1, int(math.ceil(24 / cell_w)))
    for j in range(0, columns, step):
        draw.text((panel.x0 + j * cell_w + 2, panel.y1 + 3), f"h{j}", fill=INK, font=panel.small)
    # Colour legend.
    lx = panel.x1 - legend_width + 14
    for s in range(int(panel.height)):
        value = high - (high - low) * s / max(1, panel.height - 1)
        draw.line((lx, panel.y0 + s, lx + 12, panel.y0 + s), fill=color_of(value, low, high))
    draw.text((lx + 15, panel.y0 - 2), format(high, fmt), fill=INK, font=panel.small)
    draw.text((lx + 15, panel.y1 - 11), format(low, fmt), fill=INK, font=panel.small)
    draw.text((lx - 4, panel.y1 + 3), legend, fill=INK, font=panel.small)


def _bars(panel: _Panel, labels: list, values: list, color, fmt: str, overlay: Optional[list] = None,
          overlay_color=None, hatched: Optional[set] = None, top: Optional[float] = None) -> None:
    """Vertical bars per layer; ``overlay`` draws a second, narrower bar inside (e.g. clustering time)."""
    draw = panel.draw
    finite = [v for v in values if v is not None and math.isfinite(v)]
    top = top if top is not None else (max(finite) if finite else 1.0)
    top = top if top > 0 else 1.0
    n = max(1, len(values))
    slot = panel.width / n
    bar_w = max(1.0, slot * 0.7)
    draw.line((panel.x0, panel.y1, panel.x1, panel.y1), fill=INK)
    draw.line((panel.x0, panel.y0, panel.x0, panel.y1), fill=INK)
    for frac in (0.0, 0.5, 1.0):
        y = panel.y1 - frac * panel.height
        if frac:
            draw.line((panel.x0, y, panel.x1, y), fill=GRID)
        draw.text((panel.x0 - 42, y - 6), format(top * frac, fmt), fill=INK, font=panel.small)
    label_step = max(1, int(math.ceil(28 / slot)))
    for i, value in enumerate(values):
        left = panel.x0 + i * slot + (slot - bar_w) / 2
        if value is not None and math.isfinite(value):
            height = panel.height * min(1.0, max(0.0, value / top))
            fill = DENSE_FILL if hatched and labels[i] in hatched else color
            draw.rectangle((left, panel.y1 - height, left + bar_w, panel.y1), fill=fill)
        if overlay is not None and overlay[i] is not None and math.isfinite(overlay[i]):
            height = panel.height * min(1.0, max(0.0, overlay[i] / top))
            draw.rectangle((left + bar_w * 0.25, panel.y1 - height, left + bar_w * 0.75, panel.y1),
                           fill=overlay_color)
        if i % label_step == 0:
            draw.text((left, panel.y1 + 3), f"L{labels[i]}", fill=INK, font=panel.small)


def _finite(values) -> list:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _kept_rows(data: dict) -> list:
    layers = sorted(data["layers"], key=lambda r: r["layer"])
    heads = max([len(r.get("kept_per_head") or []) for r in layers]
                + [len(r.get("key_clusters_per_head") or []) for r in layers] + [1])
    rows = []
    for r in layers:
        per_head = list(r.get("kept_per_head") or [])
        if not per_head and r.get("kept_fraction") is not None and math.isfinite(r["kept_fraction"]):
            per_head = [r["kept_fraction"]] * heads
        rows.append(per_head)
    return rows


def _time_per_call(data: dict) -> tuple:
    layers = sorted(data["layers"], key=lambda r: r["layer"])
    calls = [max(1, r.get("sparse_calls", 0) + r.get("dense_calls", 0)) for r in layers]
    return ([r.get("time_ms", 0.0) / c for r, c in zip(layers, calls)],
            [r.get("clustering_ms", 0.0) / c for r, c in zip(layers, calls)])


def shared_ranges(reports: Sequence, layer_values: Optional[Sequence[Optional[Mapping]]] = None) -> dict:
    """One range per quantity over several reports: kept fraction, key clusters, time per call, extra series."""
    data = [_as_dict(r) for r in reports]
    kept = _finite(v for d in data for row in _kept_rows(d) for v in row)
    clusters = _finite(v for d in data for r in d["layers"] for v in (r.get("key_clusters_per_head") or []))
    times = _finite(v for d in data for v in _time_per_call(d)[0])
    extra: dict = {}
    for series_set in layer_values or []:
        for name, series in (series_set or {}).items():
            extra.setdefault(name, []).extend(_finite(series.values()))
    return {"kept": (0.0, max([0.05] + kept)), "clusters": (min(clusters, default=0.0), max(clusters, default=1.0)),
            "time": max(times, default=1.0), "extra": {name: max(v, default=1.0) for name, v in extra.items()}}


def render_report(report, title: Optional[str] = None,
                  layer_values: Optional[Mapping[str, Mapping[int, float]]] = None,
                  ranges: Optional[dict] = None) -> Image.Image:
    """Image of one run report: kept fraction and key clusters per layer x head, dense layers, time per layer.

    ``report``: a RunReport or its ``to_dict()``. ``layer_values``: optional extra per-layer series
    (name -> {layer: value}), e.g. the measured error per layer, drawn as one more bar panel each.
    ``ranges``: colour scales and bar heights (``shared_ranges``); by default this report's own."""
    data = _as_dict(report)
    ranges = ranges or shared_ranges([data], [layer_values or {}])
    layers = sorted(data["layers"], key=lambda r: r["layer"])
    layer_ids = [r["layer"] for r in layers]
    dense = {r["layer"] for r in layers if r.get("dense_layer")}
    heads = max([len(r.get("kept_per_head") or []) for r in layers]
                + [len(r.get("key_clusters_per_head") or []) for r in layers] + [1])
    extra = dict(layer_values or {})

    font, small = _font(15), _font(11)
    heat_h = max(140, min(420, 16 * len(layers) + 44))
    bar_h = 150
    height = MARGIN * 2 + 52 + 2 * (heat_h + PANEL_GAP) + (1 + len(extra)) * (bar_h + PANEL_GAP)
    image = Image.new("RGB", (WIDTH, height), BACKGROUND)
    draw = ImageDraw.Draw(image)

    sparse_calls = sum(r.get("sparse_calls", 0) for r in layers)
    dense_calls = sum(r.get("dense_calls", 0) for r in layers)
    heading = title or f"{data.get('method', 'run')} report"
    draw.text((MARGIN, MARGIN), heading, fill=INK, font=_font(20))
    summary = (f"{len(layers)} layers, {sparse_calls} sparse / {dense_calls} dense calls over "
               f"{data.get('total_steps', '?')} steps, {data.get('total_time_ms', 0.0):.0f} ms in attention; "
               f"dense layers: {', '.join(map(str, sorted(dense))) or 'none'}")
    draw.text((MARGIN, MARGIN + 26), summary, fill=INK, font=small)
    y = MARGIN + 52

    kept_rows = _kept_rows(data)
    panel = _Panel(draw, (MARGIN, y, WIDTH - MARGIN, y + heat_h), "kept fraction of query-key pairs per layer x head"
                   " (grey = layer ran dense)", font, small)
    _heatmap(panel, kept_rows, heads, *ranges["kept"], ".2f", layer_ids, dense, "kept")
    y += heat_h + PANEL_GAP

    cluster_rows = [list(r.get("key_clusters_per_head") or []) for r in layers]
    panel = _Panel(draw, (MARGIN, y, WIDTH - MARGIN, y + heat_h), "key clusters per layer x head (from calibration)",
                   font, small)
    _heatmap(panel, cluster_rows, heads, *ranges["clusters"], ".0f", layer_ids, set(), "clusters")
    y += heat_h + PANEL_GAP

    time_per_call, clustering_per_call = _time_per_call(data)
    panel = _Panel(draw, (MARGIN, y, WIDTH - MARGIN, y + bar_h), "time per call, ms (blue: whole call, orange: "
                   "clustering + selection; grey: dense layer)", font, small)
    _bars(panel, layer_ids, time_per_call, TIME_COLOR, ".0f", overlay=clustering_per_call,
          overlay_color=CLUSTERING_COLOR, hatched=dense, top=ranges["time"])
    y += bar_h + PANEL_GAP

    for name, series in extra.items():
        values = [series.get(layer, series.get(str(layer))) for layer in layer_ids]
        panel = _Panel(draw, (MARGIN, y, WIDTH - MARGIN, y + bar_h), name, font, small)
        _bars(panel, layer_ids, [float("nan") if v is None else float(v) for v in values], ERROR_COLOR, ".3f",
              top=ranges["extra"].get(name))
        y += bar_h + PANEL_GAP
    return image


def render_reports(reports: Sequence, titles: Optional[Sequence[str]] = None,
                   layer_values: Optional[Sequence[Optional[Mapping]]] = None) -> Image.Image:
    """Several reports (e.g. one per method) stacked vertically in one image."""
    if not reports:
        raise ValueError("render_reports needs at least one report")
    ranges = shared_ranges(reports, layer_values)
    images = [render_report(r, titles[i] if titles else None, layer_values[i] if layer_values else None, ranges)
              for i, r in enumerate(reports)]
    return stack_images(images)


def stack_images(images: Sequence[Image.Image]) -> Image.Image:
    """Images one below the other, separated by a thin grey line."""
    out = Image.new("RGB", (max(im.width for im in images), sum(im.height for im in images) + 4 * (len(images) - 1)),
                    GRID)
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height + 4
    return out


def render_tradeoff(points: Sequence[Mapping], title: str = "relative L2 error vs kept fraction, every method",
                    height: int = 360) -> Image.Image:
    """Scatter of error (y) against kept fraction (x), one colour per method: its mean as a large marker,
    each measured call as a dot. ``points``: [{"method", "kept", "rel_l2", "calls": [(kept, rel_l2), ...]}]."""
    if not points:
        raise ValueError("render_tradeoff needs at least one method")
    image = Image.new("RGB", (WIDTH, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(11)
    legend_w = 300
    panel = _Panel(draw, (MARGIN, MARGIN, WIDTH - MARGIN - legend_w, height - MARGIN - 14), title, font, small)
    errors = _finite([p.get("rel_l2") for p in points] + [e for p in points for _, e in p.get("calls", [])])
    top = max(errors + [1e-3]) * 1.1
    draw.line((panel.x0, panel.y1, panel.x1, panel.y1), fill=INK)
    draw.line((panel.x0, panel.y0, panel.x0, panel.y1), fill=INK)
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = panel.x0 + frac * panel.width
        y = panel.y1 - frac * panel.height
        if frac:
            draw.line((x, panel.y0, x, panel.y1), fill=GRID)
            draw.line((panel.x0, y, panel.x1, y), fill=GRID)
        draw.text((x - 8, panel.y1 + 3), f"{frac:.2f}", fill=INK, font=small)
        draw.text((panel.x0 - 42, y - 6), f"{top * frac:.3f}", fill=INK, font=small)
    draw.text((panel.x1 - 150, panel.y1 + 16), "kept fraction of query-key pairs", fill=INK, font=small)

    def place(kept, err):
        return (panel.x0 + min(1.0, max(0.0, kept)) * panel.width,
                panel.y1 - min(1.0, max(0.0, err / top)) * panel.height)

    for i, p in enumerate(points):
        color = METHOD_COLORS[i % len(METHOD_COLORS)]
        for kept, err in p.get("calls", []):
            if kept is not None and err is not None and math.isfinite(kept) and math.isfinite(err):
                x, y = place(kept, err)
                draw.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=color)
        if p.get("kept") is not None and p.get("rel_l2") is not None and math.isfinite(p["kept"]) \
                and math.isfinite(p["rel_l2"]):
            x, y = place(p["kept"], p["rel_l2"])
            draw.rectangle((x - 5, y - 5, x + 5, y + 5), fill=color, outline=INK)
        ly = panel.y0 + 18 * i
        lx = WIDTH - MARGIN - legend_w + 16
        draw.rectangle((lx, ly + 2, lx + 10, ly + 12), fill=color, outline=INK)
        label = p["method"]
        if p.get("kept") is not None and math.isfinite(p.get("kept", math.nan)):
            label += f"  ({100 * p['kept']:.1f}% kept, {p['rel_l2']:.4f})"
        draw.text((lx + 16, ly), label, fill=INK, font=small)
    return image
