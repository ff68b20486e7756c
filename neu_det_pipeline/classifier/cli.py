"""`neu-det predict` and `neu-det export-onnx` (parsed in neu_det_pipeline.cli, implemented here)."""

from __future__ import annotations

import argparse

from neu_det_pipeline.recipe import console


def predict_command(args: argparse.Namespace) -> None:
    from neu_det_pipeline.classifier.inference import predict

    result = predict(args.checkpoint, args.input, args.out, boxes=args.boxes)
    unreadable, without_boxes = len(result["unreadable"]), len(result["without_boxes"])
    console.print(
        f"predicted {result['predicted']} {result['unit']} with {args.checkpoint}"
        + (f", {unreadable} unreadable (listed above)" if unreadable else "")
        + (f", {without_boxes} image(s) without a label file in {args.boxes}" if without_boxes else "")
        + f"; overlays in {args.out / 'overlays'}, table in {result['csv']}, one line per {result['unit'].split('(')[0]} in {args.out / 'results_summary.txt'}",
        highlight=False, soft_wrap=True,
    )


def export_command(args: argparse.Namespace) -> None:
    from neu_det_pipeline.classifier.inference import export_onnx

    result = export_onnx(args.checkpoint, args.out)
    differences = ", ".join(f"{name} {value:.2e}" for name, value in result["max_abs_difference"].items())
    console.print(
        f"wrote {result['onnx']} (opset {result['opset']}, dynamic batch); onnxruntime vs torch max abs difference: {differences}",
        highlight=False, soft_wrap=True,
    )
