"""Offline test harness: tiny random models in Hugging Face layout and the tokenizer fixtures they use."""
