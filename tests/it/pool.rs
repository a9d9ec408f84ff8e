//! Pooling (issue 21) against a real PostgreSQL and real clients: server
//! connections are shared per transaction, prepared statements work on
//! whichever connection a transaction lands on, settings follow their
//! client, state that cannot move pins, nothing leaks between clients,
//! and the forwarded identity is in every pooled transaction and cannot
//! be changed by the client.

use crate::common::*;

/// pgbastion in scram mode in front of the environment's PostgreSQL, with
/// a pool of `size` in `mode`, plus `extra` TOML after the upstream.
fn pooled(env: &Env, mode: &str, size: usize, extra: &str) -> Proxy {
    let pw_file = install_roles(env);
    env.pg
        .run_sql("GRANT CREATE ON SCHEMA public TO app; CREATE SCHEMA IF NOT EXISTS other AUTHORIZATION app;")
        .expect("grant");
    env.proxy(
        "require",
        &format!(
            "{}pool_mode = \"{mode}\"\npool_size = {size}\nquery_wait_timeout = \"5s\"\n{extra}",
            auth_query_keys(&pw_file)
        ),
    )
}

async fn app(proxy: &Proxy, env: &Env, extra: &str) -> PgConn {
    let conninfo = format!(
        "host=localhost port={} user=app password={APP_PASSWORD} dbname=postgres sslmode=require connect_timeout=20 {extra}",
        proxy.addr().port()
    );
    let (client, conn) = tokio_postgres::connect(&conninfo, tls_connector(&env.certs.proxy_ca))
        .await
        .expect("connect through the pool");
    (client, tokio::spawn(conn))
}

/// Backends PostgreSQL has for the role `app`.
async fn backends_of_app(direct: &tokio_postgres::Client) -> i64 {
    direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_share_a_small_pool_with_prepared_statements() {
    let env = Env::new();
    let proxy = pooled(&env, "transaction", 2, "");
    let direct = env.direct_client().await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(app(&proxy, &env, "").await);
    }
    // tokio-postgres prepares every statement under a name (s0, s1, ...):
    // each client's names are its own, on whichever connection it lands.
    for round in 0..5i32 {
        for (i, (c, _)) in clients.iter().enumerate() {
            let st = c.prepare("SELECT $1::int + $2::int").await.unwrap();
            let row = c.query_one(&st, &[&round, &(i as i32)]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), round + i as i32);
        }
    }
    assert!(
        backends_of_app(&direct).await <= 2,
        "a pool of 2 opened more connections"
    );
}
