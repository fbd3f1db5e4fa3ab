"""Sources a transfer reads from (one module per protocol)."""
