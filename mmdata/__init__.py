"""mmdata."""
