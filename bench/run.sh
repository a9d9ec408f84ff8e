#!/usr/bin/env bash
# The benchmark: pgbastion side by side with a direct connection, PgBouncer
# and HAProxy, in one run (and pgbastion with [cluster] against a Redis). Writes BENCHMARKS.md (see bench/main.rs).
# Arguments go to the harness: --quick, --rounds N, --duration S, --output F,
# or one comparison alone: --pooling, --routing, --serverless.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v pgbench >/dev/null 2>&1 || missing+=(postgresql-client)
command -v initdb >/dev/null 2>&1 || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "missing: ${missing[*]} (e.g. sudo apt-get install -y ${missing[*]})" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
cargo build --release --bin pgbastion --example bench --example relay-probe
exec target/release/examples/bench "$@"
