"""Algorithms, one file each (CleanRL style), plus the parts they share."""
