// The driver's node-postgres-compatible Pool and Client: the Postgres
// protocol inside a WebSocket to pgbastion (neonConfig is set by run.mjs,
// pipelineConnect included).

import { Client, Pool } from "@neondatabase/serverless";

import { describe, failure } from "./common.mjs";

function connectionString(env, password = env.password) {
  return `postgresql://app:${encodeURIComponent(password)}@localhost/postgres`;
}

/** A Client, connected; `f` runs with it and it is ended whatever happens. */
async function withClient(env, f) {
  const client = new Client(connectionString(env));
  await client.connect();
  try {
    return await f(client);
  } finally {
    await client.end();
  }
}

/** Pool.query, a client checked out of the Pool, then a Client of its own. */
async function queries(env) {
  const pool = new Pool({ connectionString: connectionString(env), max: 2 });
  const one = await pool.query("select 1 as one");
  const param = await pool.query("select $1::int + $2::int as sum, $3::text as text", [40, 2, "hé"]);
  const checkedOut = await pool.connect();
  const several = [];
  try {
    for (let i = 0; i < 5; i++) {
      several.push((await checkedOut.query("select $1::int * 2 as n", [i])).rows[0].n);
    }
  } finally {
    checkedOut.release();
  }
  // More queries at once than the Pool has connections.
  const parallel = await Promise.all(
    [0, 1, 2, 3, 4, 5].map(async (i) => (await pool.query("select $1::int as i, pg_sleep(0.02)", [i])).rows[0].i),
  );
  await pool.end();
  const client = await withClient(env, async (c) => {
    const who = await c.query("select current_user as user, current_database() as database");
    // No parameters: the simple protocol, two statements, two results.
    const multi = await c.query("select 1 as a; select 'two' as b");
    const param = await c.query("select $1::text || '!' as shout", ["hello"]);
    return { who: who.rows[0], multi: multi.map((r) => r.rows[0]), param: param.rows[0].shout };
  });
  return { pool_one: one.rows[0].one, pool_param: param.rows[0], pool_several: several, parallel, client };
}

async function count(c, value) {
  const r = await c.query("select count(*)::int as n from ws_tx where v = $1", [value]);
  return r.rows[0].n;
}

/** BEGIN/ROLLBACK and BEGIN/COMMIT on one session; seen from another. */
async function transaction(env) {
  const first = await withClient(env, async (c) => {
    await c.query("BEGIN");
    await c.query("insert into ws_tx values ($1)", ["rolled back"]);
    const inside = await count(c, "rolled back");
    await c.query("ROLLBACK");
    const afterRollback = await count(c, "rolled back");
    await c.query("BEGIN");
    await c.query("insert into ws_tx values ($1)", ["committed"]);
    await c.query("COMMIT");
    // A failed transaction refuses everything until its ROLLBACK.
    await c.query("BEGIN");
    const failed = await failure(() => c.query("select 1/0"));
    const aborted = await failure(() => c.query("select 1"));
    await c.query("ROLLBACK");
    const afterAbort = (await c.query("select 3 as n")).rows[0].n;
    return { inside, after_rollback: afterRollback, failed: failed.code, aborted: aborted.code, after_abort: afterAbort };
  });
  const other = await withClient(env, async (c) => ({
    committed: await count(c, "committed"),
    rolled_back: await count(c, "rolled back"),
  }));
  return { ...first, other };
}

/**
 * A wrong password, through a Client and through a Pool. With a pipelined
 * password the driver takes the login as done before the server answers
 * (connect() resolves), so the refusal arrives as the client's "error"
 * event or as the first query's error: every error is collected and the
 * first with a SQLSTATE is the one reported.
 */
async function wrongPassword(env) {
  const client = await refusal(async (errors) => {
    const c = new Client(connectionString(env, "not-the-password"));
    c.on("error", (e) => errors.push(e));
    await c.connect();
    await c.query("select 1");
    await c.end();
  });
  const viaPool = await refusal(async (errors) => {
    const pool = new Pool({ connectionString: connectionString(env, "not-the-password") });
    pool.on("error", (e) => errors.push(e));
    try {
      await pool.query("select 1");
    } finally {
      await pool.end().catch((e) => errors.push(e));
    }
  });
  return { client, pool: viaPool };
}

/** Runs `f` (which must fail) and describes the first error with a SQLSTATE. */
async function refusal(f) {
  const errors = [];
  const thrown = await failure(() => f(errors));
  const described = [...errors.map(describe), thrown];
  const first = described.find((e) => e.code) ?? thrown;
  return { ...first, errors: described.length };
}

/** Errors carry their SQLSTATE, and the session carries on after them. */
async function errors(env) {
  const client = await withClient(env, async (c) => ({
    division: await failure(() => c.query("select 1/0")),
    syntax: await failure(() => c.query("selec 1")),
    missing: await failure(() => c.query("select * from no_such_table where x = $1", [1])),
    after: (await c.query("select 2 as n")).rows[0].n,
  }));
  const pool = new Pool({ connectionString: connectionString(env) });
  const viaPool = await failure(() => pool.query("select $1::int", ["not a number"]));
  await pool.end();
  return { client, pool: viaPool };
}

export const scenarios = {
  "ws-queries": queries,
  "ws-transaction": transaction,
  "ws-wrong-password": wrongPassword,
  "ws-errors": errors,
};
