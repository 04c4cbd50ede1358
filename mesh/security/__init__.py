"""Mesh security: CURVE key files, the trusted key ring, the ZAP handler and rejection audit.

See docs/security.md for keys, roles, rotation, revocation and the threat model.
"""

from mesh.security.audit import Rejections
from mesh.security.keys import ROLES, Certificate, KeyFileError, KeyRing, create_key

__all__ = ["ROLES", "Certificate", "KeyFileError", "KeyRing", "Rejections", "create_key"]
