"""Privacy for the federation: differential-privacy accounting (method.md §11.8) and secure aggregation."""
