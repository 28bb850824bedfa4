"""Executors: the only part that differs between embedded and distributed runs."""
