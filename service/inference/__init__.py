"""Inference: serving predictions from published models.

- `preprocess` — decoding (JPEG/PNG/WebP, raw tensors) and the model's own
  preprocessing, the same pixels as the evaluation transform.
- `sessions` — ONNX Runtime (TensorRT → CUDA → CPU) and PyTorch sessions, warm-up.
- `batcher` — `DynamicBatcher`: requests of one model batched, deadlines, queue limit.
- `cache` — loaded models under a memory budget (LRU), memory measured per load.
- `stats` — per-model statistics (KServe / Triton ModelStatistics).
- `service` — `InferenceService`: what the gRPC servicers call.

Nothing here imports grpc.
"""
