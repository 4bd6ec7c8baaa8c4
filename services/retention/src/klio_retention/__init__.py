"""klio_retention."""
