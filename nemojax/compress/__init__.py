"""Compression of hybrid models: Puzzle (block library, local distillation, scoring, search)."""
