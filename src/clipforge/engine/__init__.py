"""Training engine: distributed setup, DeepSpeed (the only deepspeed import), accumulation over
chunks (exact GradCache or plain), optimizer groups and schedule."""
