"""Speed comparisons with PyTorch and the plain PyTorch tutorial they run against; not part of the package."""
