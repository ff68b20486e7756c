"""`neu-det predict` and `neu-det export-onnx` (parsed in neu_det_pipeline.cli, implemented here)."""

from __future__ import annotations

import argparse

from neu_det_pipeline.recipe import console


def predict_command(args: argparse.Namespace) -> None:
    from neu_det_pipeline.classifier.inference import predict

    result = predict(args.checkpoint, args.input, args.out)
    unreadable = len(result["unreadable"])
    console.print(
        f"predicted {result['predicted']} image(s) with {args.checkpoint}"
        + (f", {unreadable} unreadable (listed above)" if unreadable else "")
        + f"; overlays in {args.out / 'overlays'}, table in {result['csv']}",
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
