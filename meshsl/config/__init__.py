"""Topology configuration: the YAML schema and its loader."""
from meshsl.config.loader import load_spec, parse_spec
from meshsl.config.schema import TopologySpec

__all__ = ["TopologySpec", "load_spec", "parse_spec"]
