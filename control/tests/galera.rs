//! The store on a 3-node MariaDB Galera cluster started by this test
//! ([`common::galera::Galera`]): the lock scenarios of `ember_control::locks` run with
//! their callers spread over the three members (one connection pool per member), so
//! transitions of one lock race through different members. `SELECT … FOR UPDATE` does
//! not lock across members; the conflicts surface as deadlock 1213 (certification
//! failures and brute-force aborts) and are retried whole by the store's wrapper. The
//! invariants are the same as on one server: no two exclusive holders, no holder
//! alongside an exclusive one, no lost shared holder, a history with no overlap. The
//! number of re-run transactions is printed (`--nocapture`).

mod common;

use common::galera::Galera;
use ember_control::locks::{conformance, Locks};
use ember_control::store::{self, Db};

/// One `Locks` of node `node-a` per member, on a fresh database.
async fn callers(g: &Galera) -> Vec<Locks> {
    let mut out = Vec::new();
    for url in g.fresh_db() {
        let db = Db::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e:#}"));
        out.push(Locks::new(db.pool.clone(), true, "node-a"));
    }
    out[0].create_tables().await.expect("lock tables");
    // DDL replicates in total order; make sure every member has the tables.
    for l in &out[1..] {
        l.create_tables().await.expect("lock tables (idempotent)");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_scenarios_across_three_galera_members() {
    let g = tokio::task::spawn_blocking(Galera::start)
        .await
        .expect("start Galera");
    println!(
        "galera: 3 members on client ports {:?} (gcomm {:?}) in {}",
        g.members.iter().map(|m| m.port).collect::<Vec<_>>(),
        g.gcomm(),
        g.dir().display()
    );
    let mut total = 0;
    macro_rules! scenario {
        ($name:ident) => {{
            let before = store::retries_seen();
            conformance::$name(&callers(&g).await).await;
            let n = store::retries_seen() - before;
            total += n;
            println!("galera: {}: {n} transaction(s) re-run", stringify!($name));
        }};
    }
    scenario!(readers_share_writers_exclude);
    scenario!(waiting_writer_blocks_new_readers);
    scenario!(expired_leases_are_reaped);
    scenario!(concurrent_history_is_exclusive);
    scenario!(concurrent_history_is_exclusive);
    println!(
        "galera: {total} transaction(s) re-run in all, {} given up, {} grant(s)/release(s) \
         reported a conflict at commit yet took effect",
        store::retries_exhausted(),
        ember_control::locks::ambiguous_commits()
    );
    assert_eq!(
        store::retries_exhausted(),
        0,
        "a transaction ran out of attempts"
    );
    let g2 = g;
    tokio::task::spawn_blocking(move || drop(g2))
        .await
        .expect("stop Galera");
}
