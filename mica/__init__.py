"""mica package."""
