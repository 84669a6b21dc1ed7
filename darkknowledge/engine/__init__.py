"""The one training engine: device, AMP, accumulation, clipping, DDP, checkpoints, metrics."""
