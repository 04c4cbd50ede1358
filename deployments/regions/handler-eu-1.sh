#!/bin/sh
# Pattern 2 (docs/zones.md): a handler in the eu office. It runs the office's own tasks
# (module tasks_eu: task names only its handlers offer), so the leader at HQ sends those
# jobs here; it dials the HQ voters (CURVE, a handler key) and runs next to the systems it uses.
exec schedulezero handler \
    --handler-id eu-h1 \
    --keys /etc/schedulezero/keys \
    --mesh tcp://10.10.0.1:7100 \
    --mesh tcp://10.10.0.2:7100 \
    --mesh tcp://10.10.0.3:7100 \
    --tasks tasks_eu \
    --concurrency 4 \
    "$@"
