"""The ``klio`` command: argument parsing and output over the klio_restore read path."""
