"""What users run: the CLI, the config schema, job submission and one example config per task."""
