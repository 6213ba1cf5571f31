"""Prompt parsing and text conditioning."""
