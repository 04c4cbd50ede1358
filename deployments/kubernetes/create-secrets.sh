#!/bin/sh
# Make every CURVE key and the API tokens file the manifests expect, keep them in DIR, and load
# them into the namespace as the four Secrets the pods mount (README.md, "Secrets").
#
#   create-secrets.sh DIR [NAMESPACE]
#
# DIR must not hold keys yet (keys create refuses to overwrite one). It ends up with keys/ (every
# key pair), tokens.json and admin.token (the first admin token, mode 0600): keep DIR somewhere
# safe, or delete it once the admin token is stored elsewhere. Environment: SCHEDULEZERO (the
# CLI, default "schedulezero"), KUBECTL (default "kubectl"), HANDLERS (handler keys to make,
# default 6: the HPA's maxReplicas in handlers.yaml).
set -eu
[ $# -ge 1 ] || { echo "usage: $0 DIR [NAMESPACE]" >&2; exit 2; }
dir=$1
ns=${2:-schedulezero}
sz=${SCHEDULEZERO:-schedulezero}
kubectl=${KUBECTL:-kubectl}
handlers=${HANDLERS:-6}
keys=$dir/keys
umask 077
mkdir -p "$keys"

# Voters: node id = pod name = key name.
nodes="schedulezero-0 schedulezero-1 schedulezero-2"
for name in $nodes; do
    $sz keys create "$name" --role node --dir "$keys"
done
handler_names=""
i=0
while [ "$i" -lt "$handlers" ]; do
    handler_names="$handler_names schedulezero-handler-$i"
    $sz keys create "schedulezero-handler-$i" --role handler --dir "$keys"
    i=$((i + 1))
done
$sz keys create dmz-1 --role replica --zone dmz --dir "$keys"
$sz tokens create admin --role admin --file "$dir/tokens.json" >"$dir/admin.token"

# --from-file=PATH per file: each Secret holds exactly the files named, nothing else of DIR.
from_files() {
    suffix=$1
    shift
    for name in "$@"; do
        printf ' --from-file=%s' "$keys/$name$suffix"
    done
}
# shellcheck disable=SC2046  # word splitting of from_files' output is intended (no spaces)
$kubectl -n "$ns" create secret generic schedulezero-public-keys \
    $(from_files .key $nodes $handler_names dmz-1)
# shellcheck disable=SC2046
$kubectl -n "$ns" create secret generic schedulezero-node-keys $(from_files .key_secret $nodes)
# shellcheck disable=SC2046
$kubectl -n "$ns" create secret generic schedulezero-handler-keys \
    $(from_files .key_secret $handler_names)
# shellcheck disable=SC2046
$kubectl -n "$ns" create secret generic schedulezero-replica-keys $(from_files .key_secret dmz-1)
$kubectl -n "$ns" create secret generic schedulezero-api-tokens --from-file="$dir/tokens.json"
echo "admin token: $dir/admin.token" >&2
