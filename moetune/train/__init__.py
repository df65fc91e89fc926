"""Training: the loop (`loop`), its loss (`loss`), metrics and trackers (`loggers`, `curves`),
activation checkpointing and FSDP sharding, and router init fitted to clusters (`router_fit`)."""
