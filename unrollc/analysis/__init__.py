"""Analyses of step graphs: memory (bytes carried and saved for backward) and cost models."""
