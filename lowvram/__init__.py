"""lowvram: serve a model that does not fit on one modest GPU behind an OpenAI-compatible API.

lowvram/
  cli.py        serve, keys, plan
  gateway/      the FastAPI app in front of the engine (keys, limits, relay, metrics)
  engine/       the engine handle and its supervisor; one folder per backend:
    vllm/       the VRAM planner and vLLM's server (NVIDIA GPUs)
    llamacpp/   llama.cpp's server, built here, and GGUF models (CPU)
"""

__version__ = "0.2.0"
