"""Training engine: distributed setup, DeepSpeed (the only deepspeed import), optimizer groups."""
