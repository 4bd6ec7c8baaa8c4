"""klio_wal_receiver."""
