"""A real libpq 18 client (bundled with psycopg[binary]) for the tests.

Usage: libpq18.py CONNINFO MODE
  MODE "cancel": start `select pg_sleep(60)`, cancel it with libpq's
  encrypted cancel (PQcancelCreate, via conn.cancel_safe), and report.
  MODE "query": connect, run one query, and report.
Prints one JSON object: libpq version, the protocol version in use, the
backend pid the client was given (BackendKeyData), the server's real pid,
and, for "cancel", the SQLSTATE the query ended with, how long the cancel
took, and the error libpq's cancel call reported (null when none).
"""

import json
import sys
import threading
import time

import psycopg


def main():
    conninfo, mode = sys.argv[1], sys.argv[2]
    out = {"libpq": psycopg.pq.version()}
    with psycopg.connect(conninfo, autocommit=True) as conn:
        out["protocol"] = conn.pgconn.protocol_version
        out["backend_pid_seen"] = conn.info.backend_pid
        out["server_pid"] = conn.execute("select pg_backend_pid()").fetchone()[0]
        out["ssl"] = conn.execute(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()"
        ).fetchone()[0]
        if mode == "cancel":
            with psycopg.connect(conninfo, autocommit=True) as watcher:
                started = {}

                def cancel_when_running():
                    # Wait until the server runs the query, then cancel.
                    while True:
                        row = watcher.execute(
                            "select state from pg_stat_activity where pid = %s",
                            (out["server_pid"],),
                        ).fetchone()
                        if row and row[0] == "active":
                            break
                        time.sleep(0.01)
                    started["at"] = time.monotonic()
                    try:
                        conn.cancel_safe(timeout=10)
                        out["cancel_error"] = None
                    except psycopg.Error as e:
                        # The cancel may have worked even so; report both.
                        out["cancel_error"] = str(e)

                t = threading.Thread(target=cancel_when_running)
                t.start()
                try:
                    conn.execute("select pg_sleep(60)")
                    out["sqlstate"] = None
                except psycopg.Error as e:
                    out["sqlstate"] = e.sqlstate
                out["cancel_seconds"] = time.monotonic() - started.get("at", time.monotonic())
                t.join()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
