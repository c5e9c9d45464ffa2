"""The online half (FastAPI + onnxruntime, no torch): scores frames with exported graphs."""
