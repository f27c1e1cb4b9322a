"""The six DVC stage commands, one module per stage (python -m stages.<stage>)."""
