"""Training: the loop, its checkpoints, continuation, trackers and process settings."""
