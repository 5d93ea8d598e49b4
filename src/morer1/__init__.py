"""morer1."""
