"""Zones and node types: the voters' filtered change feed and the read-only replicas it feeds
(docs/zones.md)."""
