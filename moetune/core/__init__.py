"""Layer 0, imports nothing of moetune above it: errors, the recipe-field schema helpers, the console,
atomic files and verified checkpoints, the activation-recompute flag, torch-free adapter readers."""
