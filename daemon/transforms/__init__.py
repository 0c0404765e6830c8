"""Transformations that run in the apply process between the ring and the destinations."""
