"""Inference: `evaluate` (scores a model on a split), `predict` (batch inference on Ray Data) and
`proposals` (object proposals for DeconvNet's instance-wise inference)."""
