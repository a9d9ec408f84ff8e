"""Real drivers through a pooled pgbastion (tests/it/pool.rs).

Usage: pooled_drivers.py HOST PORT USER PASSWORD CAFILE SCENARIO
Each scenario uses the driver as applications do, checks every answer
itself, and prints one JSON object: {"ok": true, ...figures} or
{"ok": false, "error": "..."}; the exit status is 0 either way so the
Rust test can show the error.

Scenarios:
  psycopg   psycopg 3 with prepare_threshold=0 (every query a named
            prepared statement), several connections interleaved, more
            distinct statements than psycopg keeps (so it closes some),
            a pipeline, and libpq's own PQprepare of a name twice (42P05).
  asyncpg   asyncpg (named statements by default) with its own pool of
            connections, concurrent queries with parameters, explicit
            prepare, transactions and an error inside one.
"""

import asyncio
import json
import ssl
import sys


def conninfo(host, port, user, password, ca):
    return (
        f"host={host} port={port} user={user} password={password} dbname=postgres "
        f"sslmode=verify-full sslrootcert={ca} connect_timeout=20"
    )


def psycopg_scenario(host, port, user, password, ca):
    import psycopg

    info = conninfo(host, port, user, password, ca)
    conns = [psycopg.connect(info, autocommit=True, prepare_threshold=0) for _ in range(4)]
    for round_ in range(30):
        for i, c in enumerate(conns):
            got = c.execute("select %s::int * %s::int", (round_, i)).fetchone()[0]
            assert got == round_ * i, (round_, i, got)
    # More distinct statements than psycopg's prepared_max (100): it
    # closes the oldest ones as it goes.
    c = conns[0]
    for n in range(150):
        got = c.execute(f"select {n} + %s::int", (1,)).fetchone()[0]
        assert got == n + 1, (n, got)
    # Transactions, and an error inside one.
    with conns[1].transaction():
        conns[1].execute("select %s::text", ("in a transaction",))
    try:
        with conns[1].transaction():
            conns[1].execute("select 1/0")
        raise AssertionError("division by zero did not fail")
    except psycopg.errors.DivisionByZero:
        pass
    assert conns[1].execute("select %s::int", (5,)).fetchone()[0] == 5
    # A pipeline of prepared statements.
    with conns[2].pipeline():
        curs = [conns[2].execute("select %s::int + 1", (i,)) for i in range(20)]
    assert [cur.fetchone()[0] for cur in curs] == [i + 1 for i in range(20)]
    # libpq's PQprepare of one name twice: PostgreSQL's own 42P05, and the
    # connection goes on.
    pg = conns[3].pgconn
    first = pg.prepare(b"dup", b"select 1")
    second = pg.prepare(b"dup", b"select 2")
    state = second.error_field(psycopg.pq.DiagnosticField.SQLSTATE)
    assert first.status == psycopg.pq.ExecStatus.COMMAND_OK, first.status
    assert state == b"42P05", (second.status, state, second.error_message)
    run = pg.exec_prepared(b"dup", [])
    assert run.get_value(0, 0) == b"1", run.get_value(0, 0)
    pg.close_prepared(b"dup")
    again = pg.prepare(b"dup", b"select 3")
    assert again.status == psycopg.pq.ExecStatus.COMMAND_OK, again.error_message
    assert pg.exec_prepared(b"dup", []).get_value(0, 0) == b"3"
    pids = {c.execute("select pg_backend_pid()").fetchone()[0] for c in conns}
    for c in conns:
        c.close()
    return {"server_pids_seen": len(pids)}


async def asyncpg_main(host, port, user, password, ca):
    import asyncpg

    ctx = ssl.create_default_context(cafile=ca)
    pool = await asyncpg.create_pool(
        host=host, port=int(port), user=user, password=password,
        database="postgres", ssl=ctx, min_size=4, max_size=4,
    )

    async def work(i):
        async with pool.acquire() as c:
            for j in range(20):
                got = await c.fetchval("select $1::int + $2::int", i, j)
                assert got == i + j, (i, j, got)
            st = await c.prepare("select $1::text || '!'")
            assert await st.fetchval(f"w{i}") == f"w{i}!"
            async with c.transaction():
                await c.execute("select set_config('app.step', $1, true)", str(i))
                assert await c.fetchval("select current_setting('app.step')") == str(i)
            try:
                async with c.transaction():
                    await c.fetchval("select 1/0")
                raise AssertionError("division by zero did not fail")
            except asyncpg.exceptions.DivisionByZeroError:
                pass
            return await c.fetchval("select $1::int", i)

    got = await asyncio.gather(*(work(i) for i in range(12)))
    assert got == list(range(12)), got
    await pool.close()
    return {"workers": len(got)}


def main():
    host, port, user, password, ca, scenario = sys.argv[1:7]
    try:
        if scenario == "psycopg":
            out = psycopg_scenario(host, port, user, password, ca)
        elif scenario == "asyncpg":
            out = asyncio.run(asyncpg_main(host, port, user, password, ca))
        else:
            raise SystemExit(f"unknown scenario {scenario}")
        out["ok"] = True
    except Exception as e:  # reported to the Rust test, which fails
        import traceback

        out = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
