"""klio_cli."""
