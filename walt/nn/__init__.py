"""Shared neural-network primitives, one copy each. Imports nothing else from walt."""
