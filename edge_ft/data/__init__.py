"""Data: readers for real data sets (numpy only) and the named transfer tasks."""
