"""``visionlora serve``: many runs behind one HTTP server, LoRA adapters sharing their base."""

DEFAULT_MAX_LOADED = 64  # runs a server holds at once before unloading the least recently used
DEFAULT_MAX_PIXELS = 40_000_000  # an image whose header claims more is refused before it is decoded
API_KEY_VARIABLE = "VISIONLORA_API_KEY"  # the environment variable holding the API key (kept out of ps)
