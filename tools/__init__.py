"""Command-line tools for maintainers, outside the pipeline (python -m tools.<tool>)."""
