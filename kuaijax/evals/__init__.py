"""Evaluators chosen by name from config."""
