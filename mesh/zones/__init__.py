"""Zones and node types: what a read-only replica in a zone may see of the mesh (docs/zones.md).

- ``mesh.zones.filter``: the zone filter, one pure function over the scheduler state's snapshot
  and commands (drop whole kinds of user data, mask sensitive keys at any depth);
- ``mesh.zones.feed``: the voters' change feed (``FeedServer``): a filtered snapshot, then every
  applied change in order, pushed to the replicas that subscribe with a ``replica`` key;
- ``mesh.zones.replica``: a replica's follower of that feed and its durable local copy;
- ``mesh.zones.replica_app``: the replica process (read-only API over the local copy).
"""
