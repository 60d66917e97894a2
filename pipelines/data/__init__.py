"""Data stage: dataset layouts, `prepare` (raw datasets -> parquet shards), the prepared dataset, the
training feed's augmentation, and generated datasets in the published layouts (`synth`)."""
