"""vLLM on an NVIDIA GPU: model facts, the VRAM planner, its plan and the backend."""
