"""Who is in the mesh: peer discovery (``discovery``) and liveness (``members``).

Submodules are imported explicitly (``from mesh.membership.discovery import make_discovery``) so
that importing one does not pull in the other's dependencies (zeroconf).
"""
