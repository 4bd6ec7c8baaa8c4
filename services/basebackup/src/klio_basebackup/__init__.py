"""klio_basebackup."""
