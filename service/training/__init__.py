"""The fine-tuning engine: datasets and transforms, strategies, the training loop,
evaluation and checkpoints. Pure PyTorch, no gRPC; runs inside a job worker.

- `config`: `TrainConfig`, a FineTuneRequest validated, with each strategy's defaults;
- `data`: manifest samples → datasets, eval/train transforms, loaders;
- `strategies`: freezing, discriminative learning rates, the prototype head, AUTO;
- `engine`: `fine_tune`, `train_one_epoch`, `evaluate`, progress and cancellation;
- `metrics`: `report_from_predictions` → EvaluationReport;
- `checkpoint`: the atomic, weights-only per-epoch checkpoint;
- `selfcheck`: a fine-tune on procedural data (`python -m`, torchrun);
- `synthetic`: procedural shape datasets."""
