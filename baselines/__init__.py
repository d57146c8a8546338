"""Baseline editors of the ELDER paper, each behind the shared Editor interface."""
