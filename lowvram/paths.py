"""Where lowvram keeps its files, whatever the working directory.

    data_dir()    keys and usage (SQLite), downloaded models, the engine's log
                  ~/.local/share/lowvram on Linux ($XDG_DATA_HOME wins)
    cache_dir()   what can be rebuilt: the llama.cpp server build
                  ~/.cache/lowvram on Linux ($XDG_CACHE_HOME wins)

`LOWVRAM_HOME` moves both under one directory (a Docker volume, a test's tmp dir). A
setting naming a file (GATEWAY_DB_PATH, ENGINE_MODELS_DIR, ...) wins over all of these.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "lowvram"


def data_dir() -> Path:
    home = os.environ.get("LOWVRAM_HOME")
    return Path(home) / "data" if home else platformdirs.user_data_path(APP)


def cache_dir() -> Path:
    home = os.environ.get("LOWVRAM_HOME")
    return Path(home) / "cache" if home else platformdirs.user_cache_path(APP)
