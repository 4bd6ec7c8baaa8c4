"""Klio's read path: WAL fetch for restore_command, archive verification, checks (no CLI code)."""
