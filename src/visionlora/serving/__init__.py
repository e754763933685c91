"""``visionlora serve``: many runs behind one HTTP server, LoRA adapters sharing their base."""

DEFAULT_MAX_LOADED = 64  # runs a server holds at once before unloading the least recently used
