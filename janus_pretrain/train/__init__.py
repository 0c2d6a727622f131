"""The one training loop (pretraining and fine-tuning) and its small parts."""
