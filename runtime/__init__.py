"""sdort runtime."""
