"""Small shared helpers: console output, distributed setup, config, metrics."""
