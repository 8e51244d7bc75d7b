"""Multiface trainer: models, losses, rendering and the training loop over streamed shards."""
