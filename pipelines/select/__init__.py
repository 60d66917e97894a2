"""Selection stage: `ensemble` (greedy selection and CRF search, registered as challenger) and `promote`
(champion vs challenger on the same frozen split; the alias moves only on a real win)."""
