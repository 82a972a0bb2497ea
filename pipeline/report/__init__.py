"""Read-only SQL and figures."""
