// node-postgres through a pooled pgbastion (tests/it/pool.rs): named
// queries (`name:` makes node-postgres prepare under that name once per
// connection and reuse it), from several clients interleaved, a
// transaction with an error, and a name reused for other text.
// Usage: node pooled.js HOST PORT USER PASSWORD CAFILE
// Prints one JSON object: {"ok": true} or {"ok": false, "error": "..."}.
const fs = require("fs");
const { Client } = require("pg");

async function main() {
  const [host, port, user, password, ca] = process.argv.slice(2);
  const config = {
    host, port: Number(port), user, password, database: "postgres",
    ssl: { ca: fs.readFileSync(ca), servername: host },
  };
  const clients = [];
  for (let i = 0; i < 4; i++) {
    const c = new Client(config);
    await c.connect();
    clients.push(c);
  }
  for (let round = 0; round < 20; round++) {
    for (let i = 0; i < clients.length; i++) {
      const r = await clients[i].query({
        name: "add",
        text: "select $1::int + $2::int as sum",
        values: [round, i],
      });
      if (r.rows[0].sum !== round + i) throw new Error(`sum ${r.rows[0].sum} != ${round + i}`);
    }
  }
  const c = clients[0];
  await c.query("begin");
  await c.query({ name: "one", text: "select 1 as x" });
  try {
    await c.query({ name: "bad", text: "select 1/0" });
    throw new Error("division by zero did not fail");
  } catch (e) {
    if (e.code !== "22012") throw e;
  }
  await c.query("rollback");
  const after = await c.query({ name: "one", text: "select 1 as x" });
  if (after.rows[0].x !== 1) throw new Error("named query after rollback");
  for (const cl of clients) await cl.end();
  return { ok: true };
}

main()
  .then((r) => console.log(JSON.stringify(r)))
  .catch((e) => console.log(JSON.stringify({ ok: false, error: String(e && e.stack || e) })));
