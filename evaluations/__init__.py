"""
Sample-quality evaluations.

``evaluations.evaluator`` is a PyTorch port of guided-diffusion's TensorFlow
evaluator (FID, sFID, Inception Score, precision and recall); the network it
uses lives in ``evaluations.fid_inception``.
"""
