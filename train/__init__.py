"""The training job: its config, the trainer and what it reports (evaluation, routing report, health)."""
