"""Eval jobs: task files, lmms-eval metrics, a sharded, resumable runner."""
