//! The lock scenarios, run by the unit tests on SQLite and MariaDB with one caller
//! ([`super::tests`]) and by `control/tests/galera.rs` with callers spread over the three
//! members of a Galera cluster. Each takes `callers`: [`Locks`] handles of one node on
//! one database, reached through different servers; step *k* of a scenario runs
//! through `callers[k % callers.len()]`, so on Galera consecutive steps — and
//! concurrent tasks — go through different members.

use super::*;
use std::sync::atomic::AtomicI64;

/// The caller for step `k`.
fn at(callers: &[Locks], k: usize) -> &Locks {
    &callers[k % callers.len()]
}

pub fn req(mode: Mode, op: &str, wait_ms: u64) -> LockRequest {
    LockRequest::new("volume", "v1", mode, op, Duration::from_millis(wait_ms))
}

/// One attempt at the test lock (`volume` `v1`): the holder, or None when refused.
pub async fn try_take(l: &Locks, mode: Mode, op: &str) -> Option<Holder> {
    l.try_acquire(&req(mode, op, 0)).await.unwrap()
}

pub async fn readers_share_writers_exclude(callers: &[Locks]) {
    let a = try_take(at(callers, 0), Mode::Shared, "clone")
        .await
        .unwrap();
    let b = try_take(at(callers, 1), Mode::Shared, "clone")
        .await
        .unwrap();
    assert!(try_take(at(callers, 2), Mode::Exclusive, "delete")
        .await
        .is_none());
    let l = at(callers, 3).clone();
    let info = l.list(None, false).await.unwrap();
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].readers, 2);
    assert_eq!(info[0].writer, None);
    assert!(
        info[0].waiters.is_empty(),
        "a refused try_acquire withdraws"
    );
    assert!(at(callers, 4).release(&a.id).await.unwrap());
    assert!(
        !at(callers, 5).release(&a.id).await.unwrap(),
        "double release"
    );
    assert!(at(callers, 6).release(&b.id).await.unwrap());
    let w = try_take(at(callers, 7), Mode::Exclusive, "delete")
        .await
        .unwrap();
    assert!(try_take(at(callers, 8), Mode::Shared, "clone")
        .await
        .is_none());
    assert!(try_take(at(callers, 9), Mode::Exclusive, "extend")
        .await
        .is_none());
    assert_eq!(
        l.list(None, false).await.unwrap()[0].writer.as_deref(),
        Some(w.id.as_str())
    );
    l.release(&w.id).await.unwrap();
    assert!(l.list(None, false).await.unwrap().is_empty());
    assert_eq!(l.list(None, true).await.unwrap().len(), 1);
    check_history(&l.history("volume", "v1").await.unwrap()).unwrap();
}

pub async fn waiting_writer_blocks_new_readers(callers: &[Locks]) {
    let l = at(callers, 0).clone();
    let r = try_take(&l, Mode::Shared, "clone").await.unwrap();
    let l2 = at(callers, 1).clone();
    let writer =
        tokio::spawn(async move { l2.acquire(&req(Mode::Exclusive, "delete", 20_000)).await });
    // Wait until the writer is recorded as waiting.
    let mut waited = false;
    for _ in 0..500 {
        let info = l.list(None, false).await.unwrap();
        if info.first().is_some_and(|i| !i.waiters.is_empty()) {
            waited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(waited, "writer never recorded as waiting");
    // A new reader is refused while the writer waits (no starvation)...
    match at(callers, 2)
        .acquire(&req(Mode::Shared, "clone", 100))
        .await
    {
        Err(LockError::Busy {
            why, retry_after, ..
        }) => {
            assert!(why.contains("writer is waiting"), "{why}");
            assert!(retry_after >= Duration::from_secs(1));
        }
        other => panic!("{other:?}"),
    }
    // ...and the writer gets it once the reader leaves.
    l.release(&r.id).await.unwrap();
    let w = writer.await.unwrap().unwrap();
    assert_eq!(w.mode, Mode::Exclusive);
    l.release(&w.id).await.unwrap();
    let h = l.history("volume", "v1").await.unwrap();
    check_history(&h).unwrap();
    assert_eq!(h.len(), 2);
}

pub async fn expired_leases_are_reaped(callers: &[Locks]) {
    let l = at(callers, 1).clone();
    let short = at(callers, 0).clone().with_lease(Duration::from_secs(4));
    let dead = try_take(&short, Mode::Exclusive, "delete").await.unwrap();
    assert!(try_take(&l, Mode::Exclusive, "delete").await.is_none());
    // The heartbeat renews it...
    assert_eq!(short.renew_node().await.unwrap(), 1);
    let renewed = l.holder(&dead.id).await.unwrap().unwrap();
    assert!(renewed.lease_until >= dead.lease_until);
    assert!(try_take(&l, Mode::Shared, "clone").await.is_none());
    // ...and without heartbeats it expires: the next acquirer reaps it.
    let got = l
        .acquire(&req(Mode::Shared, "clone", 60_000))
        .await
        .unwrap();
    let h = l.history("volume", "v1").await.unwrap();
    assert_eq!(h[0].holder_id, dead.id);
    assert_eq!(h[0].release_reason.as_deref(), Some("expired"));
    check_history(&h).unwrap();
    assert!(!l.release(&dead.id).await.unwrap());
    // A restarted node drops its old holders at once.
    assert_eq!(l.release_node("node-a").await.unwrap(), 1);
    assert!(l.holder(&got.id).await.unwrap().is_none());
    // reap() finds expired holders without an acquirer.
    let tiny = at(callers, 2)
        .clone()
        .with_lease(Duration::from_millis(100));
    let e = try_take(&tiny, Mode::Shared, "clone").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(l.reap().await.unwrap(), 1);
    assert!(l.holder(&e.id).await.unwrap().is_none());
}

/// Six tasks (spread over the callers) take the lock 12 times each, one in three
/// exclusively. Besides the database's history, the holders are counted in this
/// process while they hold (counted up after the grant returns, down before the release
/// starts, so the counts never exceed the database's): an exclusive holder must find
/// nobody else holding, and a shared one no exclusive holder.
pub async fn concurrent_history_is_exclusive(callers: &[Locks]) {
    let holding = Arc::new((AtomicI64::new(0), AtomicI64::new(0)));
    let mut tasks = Vec::new();
    for t in 0..6usize {
        let l = at(callers, t).clone();
        let holding = holding.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..12usize {
                let mode = if (t + i) % 3 == 0 {
                    Mode::Exclusive
                } else {
                    Mode::Shared
                };
                let h = l.acquire(&req(mode, "test", 120_000)).await.unwrap();
                let (shared, excl) = (&holding.0, &holding.1);
                match mode {
                    Mode::Exclusive => {
                        assert_eq!(
                            excl.fetch_add(1, Ordering::SeqCst),
                            0,
                            "two exclusive holders"
                        );
                        assert_eq!(
                            shared.load(Ordering::SeqCst),
                            0,
                            "exclusive while shared held"
                        );
                    }
                    Mode::Shared => {
                        shared.fetch_add(1, Ordering::SeqCst);
                        assert_eq!(
                            excl.load(Ordering::SeqCst),
                            0,
                            "shared while exclusive held"
                        );
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
                match mode {
                    Mode::Exclusive => excl.fetch_sub(1, Ordering::SeqCst),
                    Mode::Shared => shared.fetch_sub(1, Ordering::SeqCst),
                };
                assert!(l.release(&h.id).await.unwrap(), "a held lock was lost");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let l = at(callers, 0);
    let h = l.history("volume", "v1").await.unwrap();
    assert_eq!(h.len(), 72);
    assert!(h.iter().all(|e| e.released_gen.is_some()));
    check_history(&h).unwrap();
}
