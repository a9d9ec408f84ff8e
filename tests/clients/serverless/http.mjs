// The driver's neon() function: SQL over HTTP, each query (or batch) one
// POST to pgbastion's /sql (neonConfig.fetchEndpoint, set by run.mjs).

import { neon } from "@neondatabase/serverless";

import { failure } from "./common.mjs";

function connectionString(env, password = env.password) {
  return `postgresql://app:${encodeURIComponent(password)}@localhost/postgres`;
}

/** Parameters and result types through the tagged template, fullResults, arrayMode. */
async function types(env) {
  const sql = neon(connectionString(env));
  const [row] = await sql`select
      ${7}::int as int, ${"text ✓ 'quoted'"}::text as text, ${true}::bool as bool,
      ${{ a: [1, 2], s: "x" }}::jsonb as json_param, '{"k": "v"}'::json as json,
      ${[1, 2, 3]}::int[] as ints, array['a', null, 'c'] as texts,
      null::int as nothing, ${null}::text as null_param,
      '2024-02-03 04:05:06.789+00'::timestamptz as ts,
      ${new Date("2025-06-07T08:09:10.123Z")}::timestamptz as ts_param,
      9007199254740993::int8 as big, 1.5::numeric as num, decode('0102ff', 'hex') as bytes`;
  const full = await sql.query(
    "select $1::int as a, 'x' as b from generate_series(1, 3)",
    [5],
    { fullResults: true },
  );
  const insert = await sql.query(
    "insert into http_tx values ('full 1'), ('full 2')",
    [],
    { fullResults: true },
  );
  const arrays = await sql.query("select 1 as a, 'b' as b union all select 2, 'c'", [], { arrayMode: true });
  const both = await neon(connectionString(env), { arrayMode: true, fullResults: true })`select ${"p"} as p`;
  // Requests at once, each a session of its own.
  const parallel = await Promise.all([0, 1, 2, 3, 4, 5, 6, 7].map(async (i) => (await sql`select ${i}::int as i`)[0].i));
  return {
    parallel,
    row: { ...row, bytes: Buffer.from(row.bytes).toString("hex") },
    full: {
      fields: full.fields.map((f) => ({ name: f.name, type: f.dataTypeID })),
      row_count: full.rowCount,
      command: full.command,
      rows: full.rows,
    },
    insert: { row_count: insert.rowCount, command: insert.command },
    arrays,
    both: { rows: both.rows, fields: both.fields.map((f) => f.name), command: both.command },
  };
}

/** sql.transaction: its options reach the server; a failure rolls the batch back. */
async function transaction(env) {
  const sql = neon(connectionString(env));
  const [isolation, readOnly] = await sql.transaction(
    [
      sql`select current_setting('transaction_isolation') as v`,
      sql`select current_setting('transaction_read_only') as v`,
    ],
    { isolationLevel: "Serializable", readOnly: true },
  );
  const readOnlyWrite = await failure(() =>
    sql.transaction([sql`insert into http_tx values ('read only')`], { readOnly: true }),
  );
  const committed = await sql.transaction([
    sql`insert into http_tx values (${"batch 1"})`,
    sql`insert into http_tx values (${"batch 2"}) returning v`,
  ]);
  const doomed = await failure(() =>
    sql.transaction([sql`insert into http_tx values (${"doomed"})`, sql`select 1/0`]),
  );
  const functionForm = await sql.transaction((tx) => [tx`select 1 as a`, tx`select ${"two"} as b`]);
  const rows = await sql`select v, count(*)::int as n from http_tx group by v order by v`;
  return {
    isolation: isolation[0].v,
    read_only: readOnly[0].v,
    read_only_write: readOnlyWrite,
    committed,
    doomed,
    function_form: functionForm,
    rows: Object.fromEntries(rows.map((r) => [r.v, r.n])),
  };
}

/** NeonDbError with the SQLSTATE in `.code`: bad queries, a wrong password. */
async function errors(env) {
  const sql = neon(connectionString(env));
  return {
    division: await failure(() => sql`select 1/0`),
    syntax: await failure(() => sql.query("selec 1")),
    param: await failure(() => sql`select ${"not a number"}::int`),
    wrong_password: await failure(() => neon(connectionString(env, "not-the-password"))`select 1`),
    after: await sql`select 2 as n`,
  };
}

export const scenarios = {
  "http-types": types,
  "http-transaction": transaction,
  "http-errors": errors,
};
