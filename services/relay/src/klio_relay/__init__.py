"""klio_relay."""
