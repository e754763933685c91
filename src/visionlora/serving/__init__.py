"""``visionlora serve``: many runs behind one HTTP server, LoRA adapters sharing their base."""
