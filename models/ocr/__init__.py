"""OCR: backends behind one interface, synthetic multilingual data, metrics, int8 quantization."""
