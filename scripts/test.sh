#!/usr/bin/env bash
# The test command (README, and what CI runs through .ci/run).
#
# Installs what the tests need when it is missing (PostgreSQL server and
# client, HAProxy, PgBouncer, Redis, OpenSSL, Node.js and npm from Debian
# packages; from PyPI: psycopg, boto3, prometheus_client; from npm: the
# Node.js test clients and Neon's serverless driver), then
# checks formatting, lints and import circles, runs every test, builds the
# manual and checks its links, smoke-runs the benchmark
# harness, and runs every fuzz target briefly (installing cargo-fuzz). The tests start real PostgreSQL servers; a missing part makes them
# fail, never skip.
set -euo pipefail
cd "$(dirname "$0")/.."

have_server() {
    command -v initdb >/dev/null 2>&1 || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

missing=()
have_server || missing+=(postgresql)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
command -v pgbench >/dev/null 2>&1 || missing+=(postgresql-client)
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# pgjdbc (and a Java runtime) for prepared statements through a pool.
command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)
[ -f /usr/share/java/postgresql.jar ] || missing+=(libpostgresql-jdbc-java)
# Node.js and npm for the real client drivers (node-postgres; Neon's
# serverless driver, which wants Node.js 19 or later: the machine's own
# Node.js is used when there is one).
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    # The server refuses to run as root; the package creates its user.
    missing+=(postgresql)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "missing: ${missing[*]} (install them, e.g. sudo apt-get install -y ${missing[*]})" >&2
        exit 1
    fi
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# A libpq 18 client for the cancel, protocol 3.2 and direct TLS tests:
# psycopg's binary wheel bundles its own libpq.
if ! python3 -c 'import psycopg' >/dev/null 2>&1; then
    echo "installing psycopg[binary] (bundles libpq 18)"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "psycopg[binary]>=3.2"
fi

# boto3, to check pgbastion's RDS IAM auth tokens against AWS's own SDK;
# prometheus_client, whose OpenMetrics parser reads pgbastion's /metrics.
# asyncpg: a driver that prepares every statement under a name (pooling).
for module in boto3 prometheus_client asyncpg; do
    if ! python3 -c "import $module" >/dev/null 2>&1; then
        echo "installing $module"
        python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$module"
    fi
done

# node-postgres, for its named queries through a pooled upstream.
if [ ! -d tests/clients/node/node_modules/pg ]; then
    echo "installing the Node.js test clients (npm ci)"
    (cd tests/clients/node && npm ci --no-audit --no-fund --silent)
fi

# Neon's serverless driver and ws, for the https listener's WebSocket and
# SQL-over-HTTP tests (tests/it/serverless.rs).
if [ ! -d tests/clients/serverless/node_modules/@neondatabase/serverless ]; then
    echo "installing Neon's serverless driver (npm ci in tests/clients/serverless)"
    (cd tests/clients/serverless && npm ci --no-audit --no-fund --silent)
fi

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# Dependencies between modules point one way (docs/design.md, Layout).
python3 scripts/import_cycles.py
if command -v cargo-nextest >/dev/null 2>&1; then
    cargo nextest run --locked --no-fail-fast
else
    cargo test --locked --no-fail-fast
fi

# The benchmark harness must keep working: a quick smoke run of the debug
# build (its figures mean nothing; bench/run.sh is the real benchmark).
cargo build --locked --bin pgbastion --example bench
smoke="$(mktemp)"
target/debug/examples/bench --quick --output "$smoke" >/dev/null
grep -q "pgbench -S, 8 client(s): TPS" "$smoke"
# ... including the pooling comparison (issue 21: pooled pgbastion vs
# PgBouncer in transaction mode).
grep -q "^| pooled select 64 | pgbench -S, 64 clients: TPS | [0-9]" "$smoke"
# ... and the relay's cost against the peers, with its chart (issue 24).
grep -q "^| 8 | total µs/tx | [0-9]" "$smoke"
grep -q "^Chart (TPS and proxy CPU" "$smoke"
rm -f "$smoke"
echo "benchmark harness smoke run: ok"

# The manual builds, and no link or anchor in it (or in the README) is
# broken (installs mdbook when missing).
bash scripts/docs.sh

# Every fuzz target for a short, bounded time (the long run is
# `bash scripts/fuzz.sh 600`; see docs/development.md).
bash scripts/fuzz.sh 10
