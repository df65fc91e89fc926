"""Adapters on a model: wrapping its target projections with expert layers and collecting their
state and losses (`inject`), saving and loading them in PEFT-compatible files (`io`)."""
