"""Vision-language judges: an OpenAI-compatible HTTP backend (GLM-4.5V on Z.ai, vLLM, SGLang) and a
local transformers backend; scoring methods, a judgment cache, per-image reports."""
