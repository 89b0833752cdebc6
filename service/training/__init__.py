"""The fine-tuning engine: datasets and transforms, strategies, the training loop,
evaluation and checkpoints. Pure PyTorch, no gRPC; runs inside a job worker."""
