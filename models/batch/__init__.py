"""Batch inference with exactly-once outputs: manifests, item records, generation and OCR runs."""
