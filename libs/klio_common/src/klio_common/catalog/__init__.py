"""The Tier-1 catalog: WAL archive now, base backups later."""
