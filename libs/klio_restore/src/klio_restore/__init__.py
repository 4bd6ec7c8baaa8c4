"""klio_restore."""
