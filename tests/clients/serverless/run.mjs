// Neon's serverless driver (@neondatabase/serverless) against pgbastion's
// https listener, one scenario per run: `node run.mjs <scenario>`.
//
// The Rust side (tests/it/serverless.rs) starts pgbastion and sets:
//   PGB_PORT      the https listener's port (pgbastion's certificate is for
//                 localhost; its CA comes in NODE_EXTRA_CA_CERTS)
//   PGB_PASSWORD  the password of the role `app`
//   PGB_PIPELINE  "password" or "false": the driver's pipelineConnect
// and asserts on the ONE JSON line this prints: the scenario's results, or
// {"scenario_failed": {...}} with the error that stopped it (exit status 1).

import { neonConfig } from "@neondatabase/serverless";
import ws from "ws";

import { scenarios as wsScenarios } from "./ws.mjs";
import { scenarios as httpScenarios } from "./http.mjs";
import { describe } from "./common.mjs";

const port = required("PGB_PORT");
const env = {
  port,
  password: required("PGB_PASSWORD"),
  pipeline: process.env.PGB_PIPELINE === "false" ? false : "password",
};

// WebSocket: wss://localhost:PORT/v2, the Postgres stream inside it (no
// Postgres-level TLS: the WebSocket's TLS is the protection).
neonConfig.webSocketConstructor = ws;
neonConfig.wsProxy = () => `localhost:${port}/v2`;
neonConfig.useSecureWebSocket = true;
neonConfig.forceDisablePgSSL = true;
neonConfig.pipelineTLS = false;
neonConfig.pipelineConnect = env.pipeline;
// SQL over HTTP: every neon() query is a POST to this endpoint.
neonConfig.fetchEndpoint = () => `https://localhost:${port}/sql`;

const all = { ...wsScenarios, ...httpScenarios };
const name = process.argv[2];
const scenario = all[name];
if (!scenario) {
  console.log(JSON.stringify({ scenario_failed: { message: `no scenario ${name}`, known: Object.keys(all) } }));
  process.exit(2);
}

// An error no promise carries (an "error" event nobody listens to) still
// ends the run with its JSON line.
process.on("uncaughtException", (e) => {
  console.log(JSON.stringify({ scenario_failed: { uncaught: true, ...describe(e) } }));
  process.exit(1);
});

try {
  const result = await scenario(env);
  console.log(JSON.stringify(result));
  process.exit(0);
} catch (e) {
  console.log(JSON.stringify({ scenario_failed: describe(e) }));
  process.exit(1);
}

function required(key) {
  const value = process.env[key];
  if (!value) {
    console.log(JSON.stringify({ scenario_failed: { message: `${key} is not set` } }));
    process.exit(2);
  }
  return value;
}
