"""Training: losses, AdamW with schedules and decay masks, the resumable training loop."""
