#!/bin/sh
# Pattern 1 (docs/zones.md): the public, read-only replica in the DMZ (203.0.113.10).
# It dials the admin voters' mesh port (CURVE, its replica key for zone dmz) and serves the
# public: GETs need no token (--anonymous-reads, redacted as for a `read` token), every write
# answers 403, and without a tokens file it may bind 0.0.0.0 because it is read-only.
# Put it behind a reverse proxy that terminates TLS (and rate-limits), as the seed's WAF.
exec schedulezero replica \
    --node-id dmz-1 \
    --zone dmz \
    --keys /etc/schedulezero/keys \
    --upstream tcp://10.88.88.1:7100 \
    --upstream tcp://10.88.88.2:7100 \
    --upstream tcp://10.88.88.3:7100 \
    --http 0.0.0.0:8080 \
    --anonymous-reads \
    --data-dir /var/lib/schedulezero/dmz-1 \
    "$@"
