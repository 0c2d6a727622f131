"""Process groups and device placement: the one place that reads ranks from the environment."""
