"""Data: the hymenoptera folder, its download, transforms and batching."""
