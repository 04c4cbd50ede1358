#!/bin/sh
# The Compose mesh's secrets, made once (deployments/docker/README.md):
#   docker compose run --rm init-secrets              # keys, tokens, Grafana's password
#   docker compose run --rm init-secrets token NAME read|operate|admin   # one more API token
# It runs in the image as root (to hand the files to the uid the services run as) and writes
# under $SECRETS_DIR (the ./secrets bind mount) one directory per service, holding only what
# that service needs:
#   node-N/      node-N.key_secret + the public .key of every process a voter talks to
#   handler-N/   handler-N.key_secret + the voters' .key files
#   dmz-1/       dmz-1.key_secret (a replica key of zone dmz) + the voters' .key files
#   api/         tokens.json: SHA-256 hashes of the API tokens (the voters' --api-tokens)
#   grafana-admin-password
# Running it again creates only what is missing: an existing key pair is reused (and laid out
# again), never replaced. Tokens are printed once, here, and never stored in clear.
set -eu

SECRETS_DIR=${SECRETS_DIR:-/secrets}
SERVICE_UID=${SERVICE_UID:-10001}  # the image's schedulezero user
GRAFANA_UID=${GRAFANA_UID:-472}    # the grafana/grafana image's user
VOTERS="node-1 node-2 node-3"
HANDLERS="handler-1 handler-2"
REPLICA=dmz-1
ZONE=dmz
TOKENS="$SECRETS_DIR/api/tokens.json"

# Every key pair is made in one private scratch directory, then each service's directory gets
# its own secret and the certificates it trusts. The scratch copy goes when the container does.
all=$(mktemp -d)
trap 'rm -rf "$all"' EXIT

key() {  # key NAME ROLE [ZONE]: reuse NAME's pair from any service directory, else create it
    for d in "$SECRETS_DIR"/*/; do
        if [ -f "$d$1.key_secret" ]; then
            cp -p "$d$1.key_secret" "$d$1.key" "$all/"
            return
        fi
    done
    if [ $# -eq 3 ]; then
        schedulezero keys create "$1" --role "$2" --zone "$3" --dir "$all"
    else
        schedulezero keys create "$1" --role "$2" --dir "$all"
    fi
}

lay_out() {  # lay_out NAME TRUSTED...: NAME's secret and the public certificates it trusts
    name=$1
    shift
    dir="$SECRETS_DIR/$name"
    mkdir -p "$dir"
    cp -p "$all/$name.key_secret" "$dir/"
    for peer in "$name" "$@"; do cp -p "$all/$peer.key" "$dir/"; done
}

own() {  # every file to the service user; secrets 0600, service directories 0700
    chown -R "$SERVICE_UID:$SERVICE_UID" "$SECRETS_DIR"
    chmod 0755 "$SECRETS_DIR"  # the names only: compose (as you) must see the files it mounts
    find "$SECRETS_DIR" -mindepth 1 -type d -exec chmod 0700 {} +
    find "$SECRETS_DIR" -type f -name '*.key_secret' -exec chmod 0600 {} +
    if [ -f "$SECRETS_DIR/grafana-admin-password" ]; then
        chown "$GRAFANA_UID:$GRAFANA_UID" "$SECRETS_DIR/grafana-admin-password"
        chmod 0400 "$SECRETS_DIR/grafana-admin-password"
    fi
}

token() {  # token NAME ROLE: add a token to tokens.json and print it (only the hash is kept)
    mkdir -p "$SECRETS_DIR/api"
    printf '%s token %s: ' "$2" "$1"
    schedulezero tokens create "$1" --role "$2" --file "$TOKENS"
}

if [ "${1:-}" = token ]; then
    [ $# -eq 3 ] || { echo "usage: init-secrets.sh token NAME read|operate|admin" >&2; exit 2; }
    token "$2" "$3"
    own
    exit 0
fi
[ $# -eq 0 ] || { echo "usage: init-secrets.sh [token NAME ROLE]" >&2; exit 2; }

mkdir -p "$SECRETS_DIR"
for v in $VOTERS; do key "$v" node; done
for h in $HANDLERS; do key "$h" handler; done
key "$REPLICA" replica "$ZONE"

# A voter trusts every voter, handler and replica of the mesh; the others trust the voters.
# shellcheck disable=SC2086  # the lists are meant to split into names
for v in $VOTERS; do lay_out "$v" $VOTERS $HANDLERS $REPLICA; done
# shellcheck disable=SC2086
for h in $HANDLERS; do lay_out "$h" $VOTERS; done
# shellcheck disable=SC2086
lay_out "$REPLICA" $VOTERS

if [ ! -f "$TOKENS" ]; then
    echo "API tokens (shown once; keep them in your password manager):"
    token ops admin
    token viewer read
else
    echo "$TOKENS exists: kept (add one with: docker compose run --rm init-secrets token NAME ROLE)"
fi
if [ ! -f "$SECRETS_DIR/grafana-admin-password" ]; then
    python -c 'import secrets; print(secrets.token_urlsafe(18))' > "$SECRETS_DIR/grafana-admin-password"
    echo "Grafana admin password: $(cat "$SECRETS_DIR/grafana-admin-password")"
fi
own
echo "secrets ready in $SECRETS_DIR (one directory per service)"
