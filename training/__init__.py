"""The offline half (PyTorch): synthetic frames, networks, training, scoring, calibration, export."""
