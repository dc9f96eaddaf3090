"""Data: where it comes from (folders, a seeded split of one folder, TFDS sets), transforms and batching."""
