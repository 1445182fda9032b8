"""hex package."""
