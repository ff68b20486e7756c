"""Step 5's library: image folders, feature extractors, fidelity / diversity / texture metrics, curation,
YOLO utility runs and reports; also behind `neu-det metrics` and `neu-det compare`.

    images       labelled image folders (NEU-DET, YOLO, class subfolders, Step 4) as grayscale arrays
    features     feature extractors by name (inception, clip, dinov3)
    fidelity     KID, FID, k-NN precision / recall from features
    perceptual   LPIPS, edge-SSIM, multi-scale LBP class matrix
    suite        all of the above for a real and a synthetic folder, per class and overall
    curation     rejection rules with reasons, the curated YOLO dataset
    utility      YOLO runs (real, real + synthetic, oracle), label consistency, gain recovered
    inputs       Step 5's Step 0 / Step 4 inputs
    report, step_report, commands   report.md / report.html, `neu-det metrics` and `neu-det compare`
"""
