"""DVC pipeline stages (one module per stage) and the small library they share."""
