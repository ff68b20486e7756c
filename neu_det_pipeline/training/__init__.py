"""Diffusion fine-tuning shared by textual inversion (Step 1) and LoRA / DoRA (Step 3)."""
