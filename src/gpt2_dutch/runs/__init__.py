"""What a training run leaves behind: its records (run_config.json, metrics.jsonl, checkpoints) and its model card."""
