#!/bin/sh
# Pattern 2 (docs/zones.md): the read-only replica of the eu office (10.20.0.10).
# Local reads (dashboards, reports) are answered from its own copy, without a round trip to HQ;
# reads need a token of the office's tokens file (no anonymous reads: an internal zone).
# Writes answer 403: send them to HQ (https://10.10.0.1:8100).
exec schedulezero replica \
    --node-id eu-1 \
    --zone eu \
    --keys /etc/schedulezero/keys \
    --upstream tcp://10.10.0.1:7100 \
    --upstream tcp://10.10.0.2:7100 \
    --upstream tcp://10.10.0.3:7100 \
    --http 10.20.0.10:8080 \
    --api-tokens /etc/schedulezero/eu-tokens.json \
    --data-dir /var/lib/schedulezero/eu-1 \
    "$@"
