#!/bin/sh
# Property-based run of Ember's OpenAPI spec against a live `emberd serve`:
# schemathesis generates valid and invalid requests for every operation and fails on
# any 5xx. Runs once with the admin token and once with a project member's token.
#
# Usage: control/scripts/schemathesis.sh [EMBERD_BINARY] [DATABASE_URL]
#   EMBERD_BINARY  default: ${CARGO_TARGET_DIR:-target}/debug/emberd
#   DATABASE_URL   default: SQLite in a temp data dir (pass mysql://… for MariaDB)
# Env: ST (schemathesis CLI, default `st`; install with `pip install schemathesis`),
#      ST_EXAMPLES (max examples per operation, default 40).
set -eu
EMBERD=$(realpath -m "${1:-${CARGO_TARGET_DIR:-target}/debug/emberd}")
DB=${2:-}
ST=${ST:-st}
EXAMPLES=${ST_EXAMPLES:-40}
command -v "$ST" >/dev/null 2>&1 || { echo "schemathesis ($ST) is not installed: pip install schemathesis" >&2; exit 1; }
[ -x "$EMBERD" ] || { echo "emberd binary $EMBERD not found: cargo build -p emberd" >&2; exit 1; }

DIR=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
set -- serve --data-dir "$DIR/data" --rest "127.0.0.1:$PORT" --nbd 127.0.0.1:0 --node-name schemathesis
[ -n "$DB" ] && set -- "$@" --database "$DB"
"$EMBERD" "$@" > "$DIR/emberd.log" 2>&1 &
PID=$!
cleanup() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT INT TERM
i=0
until [ -s "$DIR/data/admin-token" ] && python3 -c "import socket; socket.create_connection(('127.0.0.1',$PORT),1)" 2>/dev/null; do
  i=$((i+1)); [ $i -lt 300 ] || { cat "$DIR/emberd.log"; echo "emberd did not start" >&2; exit 1; }
  kill -0 "$PID" 2>/dev/null || { cat "$DIR/emberd.log"; echo "emberd exited" >&2; exit 1; }
  sleep 0.2
done
ADMIN=$(cat "$DIR/data/admin-token")
URL="http://127.0.0.1:$PORT"
# A member token of a second project, so the run also covers the non-admin paths.
PROJECT=$(curl -sf -H "X-Auth-Token: $ADMIN" -H 'Content-Type: application/json' \
  -d '{"project": {"name": "fuzz"}}' "$URL/v3/projects" | python3 -c 'import json,sys; print(json.load(sys.stdin)["project"]["id"])')
MEMBER=$(curl -sf -H "X-Auth-Token: $ADMIN" -H 'Content-Type: application/json' \
  -d '{"token": {"role": "member"}}' "$URL/v3/projects/$PROJECT/tokens" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"]["token"])')

# Real objects, so generated requests also reach the handlers' deep paths (second pass).
post() { curl -sf -H "X-Auth-Token: $1" -H 'Content-Type: application/json' -d "$3" "$URL$2"; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
ADMIN_PROJECT=$(curl -sf -H "X-Auth-Token: $ADMIN" "$URL/v3/auth/tokens" | field 'd["token"]["project_id"]')
TYPE=$(post "$ADMIN" "/v3/$ADMIN_PROJECT/types" '{"volume_type": {"name": "fuzz", "extra_specs": {"k": "v"}, "metadata": {"m": "v"}}}' | field 'd["volume_type"]["id"]')
post "$ADMIN" "/v3/$ADMIN_PROJECT/types/$TYPE/encryption" '{"encryption": {"provider": "luks"}}' > /dev/null
post "$ADMIN" /v2/metadefs/namespaces '{"namespace": "Fuzz", "properties": {"p": {"title": "P", "type": "integer", "minimum": 1}}, "resource_type_associations": [{"name": "OS::Cinder::Volumetype", "prefix": "fuzz:"}]}' > /dev/null
SECRET=$(post "$ADMIN" /v1/secrets '{"payload": "pw", "payload_content_type": "text/plain"}' | field 'd["secret_ref"].rsplit("/",1)[1]')
ORDER=$(post "$ADMIN" /v1/orders '{"type": "key", "meta": {"algorithm": "aes", "bit_length": 256}}' | field 'd["order_ref"].rsplit("/",1)[1]')
cat > "$DIR/st.toml" <<TOML
[parameters]
"path.project_id" = "$ADMIN_PROJECT"
"path.type_id" = "$TYPE"
"path.namespace" = "Fuzz"
"path.property_name" = "p"
"path.secret_id" = "$SECRET"
"path.order_id" = "$ORDER"
TOML

status=0
run_st() {
  # Run from the temp dir: schemathesis writes a cache directory into the cwd.
  (cd "$DIR" && "$ST" "$@" --checks not_a_server_error --max-examples "$EXAMPLES" --workers 1 \
    --phases examples,coverage,fuzzing --generation-allow-x00 false --request-timeout 30 \
    --suppress-health-check all) || status=1
}
run_st run "$URL/openapi.json" -H "X-Auth-Token: $ADMIN"
run_st run "$URL/openapi.json" -H "X-Auth-Token: $MEMBER"
run_st --config-file "$DIR/st.toml" run "$URL/openapi.json" -H "X-Auth-Token: $ADMIN"
if grep -q '"level":"ERROR"\|ERROR' "$DIR/emberd.log"; then
  echo "--- errors in the emberd log:"; grep 'ERROR' "$DIR/emberd.log" | head -20
fi
exit $status
