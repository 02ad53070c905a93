"""Thin job entrypoints: parse config → build objects → call ``pipeline`` / ``enat`` code.

Each runs the same under ``ray job submit … -- python -m jobs.<name>`` and locally.
"""
