"""llama.cpp on the CPU: GGUF models, where they come from, the plan and the backend."""
