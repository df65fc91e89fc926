"""moetune: fine-tune mixtures of parameter-efficient experts on Hugging Face causal LMs.

Layers (see LAYERS): a module imports only modules of its own layer or below, never above, and
the import graph has no cycle (tests/test_layers.py checks both from the source). An import inside
a function is for a heavy dependency (torch in the CLI, transformers, matplotlib, sklearn,
bitsandbytes), never to dodge a cycle.
"""
import os

# Nothing moetune reads by default lives on the hub: fail at once on a miss instead of
# waiting on the network. Set HF_HUB_OFFLINE=0 to let a hub id download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"

LAYERS: dict[int, tuple[str, ...]] = {
    7: ("cli", "__main__"),                                   # parse arguments, call one stage
    6: ("stages", "validate", "cluster", "domain_experts",    # what a command does
        "merge", "multimerge", "collapse", "rundir", "chat", "runs",
        "inspect_data"),
    5: ("train", "evaluate", "report", "loss", "mmlu",
        "generation", "loggers", "curves", "checkpointing", "fsdp", "router_fit"),  # the training loop; scoring; routing statistics
    4: ("inject", "adapters", "stock"),                       # wrap a model's projections; save/load adapters
    3: ("experts", "routing"),                                # one file per paper (experts/*); gates and losses
    2: ("models", "quant", "data", "datagen", "sources", "pipeline", "packing"),  # bases and tokenizers; data
    1: ("recipe", "recipe_sections", "expert_configs"),       # the typed recipe schema (torch-free)
    0: ("errors", "schema", "adapter_files", "checkpoint", "ui", "recompute"),  # errors and small helpers
}
"""Layer of each module of `moetune` (a subpackage counts as one module: `experts` covers experts/*)."""
