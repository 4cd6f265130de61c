"""Ray job entrypoints: ``ray job submit --working-dir . -- python -m jobs.<generate|judge|report> ...``."""
