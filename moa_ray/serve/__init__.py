"""Ray Serve: one deployment per model, built from the config (config -> builder -> deployments)."""
