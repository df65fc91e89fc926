"""Scoring a model: held-out loss, exact match and multiple choice (`evaluate`, `mmlu`), sampling for
chat/generate (`generation`), and the routing report of routed adapters (`report`)."""
