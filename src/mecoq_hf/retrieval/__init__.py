"""Codes out: search settings, score tables and deterministic top-k (`scoring`), mAP@K / PR / P@N (`metrics`),
scores from codes and the one evaluator (`evaluation`), shallow baselines (`baselines`), the searchable code
index (`index`) and its search backends (`backends`, faiss through `faiss_interop`), and indexes of image
datasets with their JSON sidecar (`image_index`, `sidecar`)."""
