"""The gateway: the FastAPI app between OpenAI clients and the engine (`create_app`)."""
