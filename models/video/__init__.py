"""Video: frames sampled by time (frames), the OCR text track over them (ocr, track)."""
