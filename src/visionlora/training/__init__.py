"""Training: the loop, its checkpoints, continuation, trackers and process settings; many jobs packed."""

DEFAULT_PACK_ROWS = 128  # rows (images) of one packed forward and backward at most on a GPU (--pack-rows auto)
