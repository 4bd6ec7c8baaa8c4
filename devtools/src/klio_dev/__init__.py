"""klio_dev."""
