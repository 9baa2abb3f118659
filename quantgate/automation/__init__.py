"""Reacting to MLflow Model Registry events: the webhook bridge that hands new versions to quantgate's flows."""
