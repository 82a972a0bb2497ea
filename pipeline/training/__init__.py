"""Fine-tuning skip models."""
