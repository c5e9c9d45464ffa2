"""The contract between training and service: frames, frame readers, model manifests.

Imports neither torch nor FastAPI (a test enforces it).
"""
