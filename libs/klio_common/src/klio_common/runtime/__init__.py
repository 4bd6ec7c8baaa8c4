"""How every Klio service lives: settings, NATS bus, outbox, lifecycle, health, metrics, logs."""
