"""Recipe -> DeepSpeed engine, data, tracking and the training loop (imports deepspeed lazily)."""
