"""Base models: loading (built-in, local, hub, 4-bit), tokenizers, devices, target projections
(`load`), and where a causal LM keeps its decoder blocks (`layers`)."""
