"""Helpers shared by the test tiers (processes, Prometheus, namespaces, sample messages)."""
