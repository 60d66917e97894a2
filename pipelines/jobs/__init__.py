"""Jobs that chain the stages: `retrain` (scheduled retraining), `demo` (the whole pipeline on generated
data) and `reproduce` (a paper's training procedure)."""
