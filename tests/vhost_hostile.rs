//! Hostile vhost-user frontends and guests against a real `emberd serve` (issue 11,
//! items 2–4 and the review of the message handling). Each test attaches two volumes:
//! the *victim* over vhost-user, which the test attacks with a raw frontend and rings it
//! writes by hand (`tests/guest/ring.rs`), and a *bystander* over NBD, which `qemu-io`
//! writes and reads during the attack. Each attack must cost the attacker its queue or
//! its connection, with a log line saying why, while emberd stays up, its memory stays
//! bounded (RSS and peak RSS from `/proc/PID/status` are printed) and the bystander keeps
//! serving; detaching the attacked volume must end within a bound.

mod common;
#[path = "guest/ring.rs"]
mod ring;

use common::serve::{mem_kib as rss, ServeNode as Node};
use common::{require_tool, run_ok};
use ring::{Conn, Opts, Session, D_INDIRECT, D_NEXT, D_WRITE};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::FrontendReq;

/// How long detaching the attacked volume may take.
const DETACH_BOUND: Duration = Duration::from_secs(60);

/// The victim (vhost-user) and the bystander (NBD) of one test.
struct Scene {
    node: Node,
    victim: String,
    victim_att: String,
    sock: PathBuf,
    bystander_uri: String,
    base_rss: (u64, u64),
}

impl Scene {
    fn new() -> Scene {
        require_tool("qemu-io");
        let node = Node::start_temp(&[]);
        let victim = node.volume("victim", 1, None);
        let bystander = node.volume("bystander", 1, None);
        let v = node.attach(&victim, "vhost-user");
        let b = node.attach(&bystander, "nbd");
        let sock = PathBuf::from(v["socket_path"].as_str().unwrap());
        let victim_att = v["attachment_id"].as_str().unwrap().to_string();
        let bystander_uri = b["uri"].as_str().unwrap().to_string();
        // Warm up the bystander path (and emberd's allocator) before the baseline.
        bystander_serves(&bystander_uri, 0x11);
        let base_rss = rss(node.pid());
        Scene {
            node,
            victim,
            victim_att,
            sock,
            bystander_uri,
            base_rss,
        }
    }

    /// During the attack: emberd is alive and the other volume answers qemu-io.
    fn others_unharmed(&mut self, what: &str) {
        assert!(
            self.node.alive(),
            "{what}: emberd died; log:\n{}",
            self.node.log()
        );
        bystander_serves(&self.bystander_uri, 0x5a);
        let (rss_kib, hwm_kib) = rss(self.node.pid());
        eprintln!(
            "{what}: emberd RSS {} MiB (peak {} MiB; before the attack {} MiB, peak {} MiB)",
            rss_kib / 1024,
            hwm_kib / 1024,
            self.base_rss.0 / 1024,
            self.base_rss.1 / 1024
        );
    }

    /// Peak RSS growth since the scene was set up, in MiB.
    fn peak_growth_mib(&self) -> u64 {
        rss(self.node.pid()).1.saturating_sub(self.base_rss.1) / 1024
    }

    /// Detach the victim within [`DETACH_BOUND`]; its vhost threads are gone after.
    fn detach_victim(&mut self, what: &str) {
        let took = self.node.detach(&self.victim, &self.victim_att);
        eprintln!("{what}: detaching the attacked volume took {took:?}");
        assert!(took < DETACH_BOUND, "{what}: detach took {took:?}");
        let threads = vhost_threads(self.node.pid());
        assert!(
            threads.is_empty(),
            "{what}: vhost threads left: {threads:?}"
        );
        assert!(self.node.alive(), "{what}: emberd died at detach");
    }

    fn log_has(&self, needle: &str) -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if self.node.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

/// qemu-io writes a pattern and reads it back over the bystander's NBD export.
fn bystander_serves(uri: &str, byte: u8) {
    let w = format!("write -P {byte:#x} 1M 64k");
    let r = format!("read -P {byte:#x} 1M 64k");
    let out = run_ok(Command::new("qemu-io").args(["-f", "raw", uri, "-c", &w, "-c", &r]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Pattern verification failed"), "{text}");
}

/// Names of `pid`'s vhost-user threads.
fn vhost_threads(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if comm == "vhost-listen" || comm.starts_with("vhost-q") {
            out.push(comm.to_string());
        }
    }
    out
}

/// CPU time (clock ticks) used by `pid`'s vhost queue threads.
fn queue_cpu_ticks(pid: u32) -> u64 {
    let mut total = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // "tid (comm) state ..." — comm may hold spaces: split after the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if !head.contains("(vhost-q") {
            continue;
        }
        let f: Vec<&str> = rest.split_whitespace().collect();
        // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the comm.
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        total += n(11) + n(12);
    }
    total
}

/// Assert the queue threads do not spin: at most 0.3 s of CPU in 2 s.
fn assert_not_spinning(pid: u32, what: &str) {
    let before = queue_cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = queue_cpu_ticks(pid) - before;
    eprintln!("{what}: vhost queue threads used {used} ticks of CPU in 2 s");
    assert!(
        used <= 30,
        "{what}: a queue thread spins ({used} ticks in 2 s)"
    );
}

/// Item 2: with EVENT_IDX, an `avail.idx` more than the queue size ahead of the last
/// index seen made the worker's pop loop spin forever; GET_VRING_BASE never answered
/// and detach left the thread spinning. Now: the queue breaks (logged, error eventfd
/// signalled), GET_VRING_BASE answers at once, nothing spins.
#[test]
fn avail_index_far_ahead_breaks_the_queue_not_the_daemon() {
    let mut sc = Scene::new();
    let o = Opts::default();
    let mut s = Session::start(&sc.sock, &o).expect("a well-formed setup");
    s.rings.read_request(0, 0x8000, 0);
    s.rings.publish(0);
    s.kick.write(1).unwrap();
    s.rings.wait_used(1);
    // The attack: avail.idx jumps queue-size + 1 ahead.
    s.rings.set_avail_idx(1 + o.size + 1);
    s.kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_not_spinning(sc.node.pid(), "avail.idx far ahead");
    assert!(
        s.err_signalled_within(Duration::from_secs(10)),
        "the vring error eventfd was not signalled; log:\n{}",
        sc.node.log()
    );
    assert!(sc.log_has("virtqueue broken"), "{}", sc.node.log());
    sc.others_unharmed("avail.idx far ahead");
    // GET_VRING_BASE answers at once, and the frontend may start the ring again (a
    // reset guest): it runs.
    s.rings.set_avail_idx(1);
    let t = Instant::now();
    let base = s.restart(None).expect("GET_VRING_BASE answers");
    eprintln!("GET_VRING_BASE answered {base} in {:?}", t.elapsed());
    assert_eq!(base, 1, "nothing was popped from the impossible ring");
    s.rings.avail_idx = 1;
    s.rings.read_request(3, 0x9000, 1);
    s.rings.publish(3);
    s.kick.write(1).unwrap();
    s.rings.wait_used(2);
    assert_eq!(s.rings.byte(0x9300), 0, "status OK after the restart");
    sc.detach_victim("avail.idx far ahead");
}

/// Item 4: an indirect table may hold 65,535 entries; 1,024 chains pointing at one
/// cost ~1 GiB of bookkeeping in one kick. A chain is never longer than the queue size
/// now: the first such chain breaks the queue and nothing is allocated for it.
#[test]
fn indirect_tables_longer_than_the_queue_cost_no_memory() {
    let mut sc = Scene::new();
    let o = Opts {
        size: 1024,
        mem_len: 4 << 20,
        region_len: 4 << 20,
        ..Opts::default()
    };
    let mut s = Session::start(&sc.sock, &o).expect("a well-formed setup");
    let table = 0x10_0000u64;
    let entries: u32 = 65_535;
    for i in 0..entries {
        let last = i + 1 == entries;
        s.rings.desc(
            table,
            i as u16,
            0x8000,
            1,
            if last { D_WRITE } else { D_NEXT },
            (i + 1) as u16,
        );
    }
    for h in 0..o.size {
        s.rings
            .desc(o.layout.desc, h, table, entries * 16, D_INDIRECT, 0);
        s.rings.publish(h);
    }
    s.kick.write(1).unwrap();
    // Broken (today) or every chain answered (before): either way the kick is over.
    let t = Instant::now();
    let broken = loop {
        if s.err_signalled_within(Duration::from_millis(100)) {
            break true;
        }
        if s.rings.used_idx() == o.size || t.elapsed() > Duration::from_secs(60) {
            break false;
        }
    };
    let growth = sc.peak_growth_mib();
    eprintln!("indirect tables: peak RSS grew by {growth} MiB");
    assert!(growth < 64, "peak RSS grew by {growth} MiB");
    assert!(
        broken,
        "the vring error eventfd was not signalled; log:\n{}",
        sc.node.log()
    );
    assert!(
        sc.log_has("longer than the queue size"),
        "{}",
        sc.node.log()
    );
    sc.others_unharmed("indirect tables of 65,535 entries");
    s.vring_base().expect("GET_VRING_BASE answers");
    sc.detach_victim("indirect tables of 65,535 entries");
}

/// A legal but heavy ring: 1,024 chains of 1,024 descriptors each (indirect tables as
/// long as the queue) are all answered (IOERR: too many segments), with bounded memory.
#[test]
fn queue_sized_chains_are_served_with_bounded_memory() {
    let mut sc = Scene::new();
    let o = Opts {
        size: 1024,
        mem_len: 4 << 20,
        region_len: 4 << 20,
        ..Opts::default()
    };
    let mut s = Session::start(&sc.sock, &o).expect("a well-formed setup");
    let table = 0x10_0000u64;
    let n = o.size;
    // Header, 1,022 data bytes, status: a read with too many segments.
    s.rings
        .mem
        .write_obj(0u32, vm_memory::GuestAddress(0x8000))
        .unwrap();
    use vm_memory::Bytes;
    for i in 0..n {
        let (addr, len, flags) = match i {
            0 => (0x8000, 16, D_NEXT),
            _ if i + 1 == n => (0x9000, 1, D_WRITE),
            _ => (0xa000, 1, D_NEXT | D_WRITE),
        };
        s.rings.desc(table, i, addr, len, flags, i + 1);
    }
    for h in 0..o.size {
        s.rings
            .desc(o.layout.desc, h, table, u32::from(n) * 16, D_INDIRECT, 0);
        s.rings.publish(h);
    }
    s.kick.write(1).unwrap();
    s.rings.wait_used(o.size);
    assert_eq!(s.rings.byte(0x9000), 1, "IOERR");
    assert!(
        !s.err_signalled_within(Duration::from_millis(200)),
        "not broken"
    );
    let growth = sc.peak_growth_mib();
    eprintln!("queue-sized chains: peak RSS grew by {growth} MiB");
    assert!(growth < 64, "peak RSS grew by {growth} MiB");
    sc.others_unharmed("1,024 chains of 1,024 descriptors");
    sc.detach_victim("1,024 chains of 1,024 descriptors");
}

/// Item 3: a memory region longer than its memfd was mapped, and the first access past
/// the file's end raised SIGBUS in the whole daemon. Now the memory table is refused
/// (fstat), the frontend dropped, and the export serves the next frontend.
#[test]
fn memory_region_longer_than_its_file_is_refused() {
    let mut sc = Scene::new();
    // Rings at 512 KiB, in the declared 1 MiB region but past the 64 KiB memfd.
    let o = Opts {
        mem_len: 64 << 10,
        region_len: 1 << 20,
        layout: ring::Layout::at(0x8_0000),
        ..Opts::default()
    };
    match Session::start(&sc.sock, &o) {
        Err(e) => {
            assert!(
                sc.node.alive(),
                "emberd died during the setup ({e}): {:?}",
                sc.node.daemon.child.try_wait()
            );
            assert!(e.contains("SET_MEM_TABLE"), "{e}");
        }
        Ok(s) => {
            // Today's code accepts it: the kick makes emberd touch the missing pages.
            s.kick.write(1).unwrap();
            std::thread::sleep(Duration::from_secs(2));
            panic!(
                "a memory region longer than its file was accepted; emberd alive: {}",
                sc.node.alive()
            );
        }
    }
    assert!(
        sc.log_has("but its file holds 65536 bytes"),
        "{}",
        sc.node.log()
    );
    sc.others_unharmed("memory region longer than its file");
    // An offset past the end, through ADD_MEM_REG; and an fd that is not a file.
    let c = Conn::connect(&sc.sock);
    c.negotiate(0, ring::P_MEM_SLOTS).unwrap();
    let f = ring::memfd(1 << 20);
    let e = c
        .ack(
            FrontendReq::ADD_MEM_REG,
            &ring::single_region(0, 1 << 20, ring::UADDR, 1 << 20),
            &[f.as_raw_fd()],
        )
        .unwrap_err();
    eprintln!("ADD_MEM_REG past the end: {e}");
    let c = Conn::connect(&sc.sock);
    c.negotiate(0, 0).unwrap();
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    assert!(c
        .ack(
            FrontendReq::SET_MEM_TABLE,
            &ring::mem_table(&[(0, 1 << 20, ring::UADDR, 0)]),
            &[a.as_raw_fd()],
        )
        .is_err());
    // The export still serves a well-behaved frontend.
    let mut s = Session::start(&sc.sock, &Opts::default()).expect("a good frontend");
    s.rings.read_request(0, 0x8000, 0);
    s.rings.publish(0);
    s.kick.write(1).unwrap();
    s.rings.wait_used(1);
    assert_eq!(s.rings.byte(0x8300), 0);
    drop(s);
    sc.detach_victim("memory region longer than its file");
}

/// Item 3, inflight: an inflight fd shorter than the area it is said to hold was mapped
/// and read at queue start (SIGBUS). Now SET_INFLIGHT_FD is refused.
#[test]
fn inflight_fd_shorter_than_its_area_is_refused() {
    let mut sc = Scene::new();
    let o = Opts {
        inflight: Some(Some(0)),
        ..Opts::default()
    };
    match Session::start(&sc.sock, &o) {
        Err(e) => {
            assert!(
                sc.node.alive(),
                "emberd died during the setup ({e}): {:?}",
                sc.node.daemon.child.try_wait()
            );
            assert!(e.contains("SET_INFLIGHT_FD"), "{e}");
        }
        Ok(s) => {
            s.kick.write(1).unwrap();
            std::thread::sleep(Duration::from_secs(2));
            panic!(
                "an empty inflight fd was accepted; emberd alive: {}",
                sc.node.alive()
            );
        }
    }
    assert!(sc.log_has("but its file holds 0"), "{}", sc.node.log());
    sc.others_unharmed("inflight fd shorter than its area");
    // With the area the backend handed out, everything works.
    let o = Opts {
        inflight: Some(None),
        ..Opts::default()
    };
    let mut s = Session::start(&sc.sock, &o).expect("a good frontend with inflight");
    s.rings.read_request(0, 0x8000, 0);
    s.rings.publish(0);
    s.kick.write(1).unwrap();
    s.rings.wait_used(1);
    drop(s);
    sc.detach_victim("inflight fd shorter than its area");
}

/// Kick/call/err fds must be eventfds: a pipe whose writer is gone stayed readable and
/// made the queue thread spin; a semaphore eventfd the frontend filled did the same.
#[test]
fn kick_fds_that_stay_readable_make_nothing_spin() {
    let mut sc = Scene::new();
    // A pipe as the kick fd: refused.
    let c = Conn::connect(&sc.sock);
    c.negotiate(0, 0).unwrap();
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: we own both fds; the write end is closed at once.
    unsafe { libc::close(fds[1]) };
    let res = c.ack(FrontendReq::SET_VRING_KICK, &ring::u64le(0), &[fds[0]]);
    // SAFETY: our read end.
    unsafe { libc::close(fds[0]) };
    if res.is_ok() {
        // Today's code: finish the setup so the queue runs on the pipe.
        let f = ring::memfd(1 << 20);
        c.ack(
            FrontendReq::SET_MEM_TABLE,
            &ring::mem_table(&[(0, 1 << 20, ring::UADDR, 0)]),
            &[f.as_raw_fd()],
        )
        .unwrap();
        c.ack(FrontendReq::SET_VRING_NUM, &ring::state(0, 16), &[])
            .unwrap();
        let l = ring::Layout::at(0);
        c.ack(
            FrontendReq::SET_VRING_ADDR,
            &ring::vring_addr(
                0,
                ring::UADDR + l.desc,
                ring::UADDR + l.used,
                ring::UADDR + l.avail,
            ),
            &[],
        )
        .unwrap();
        c.ack(FrontendReq::SET_VRING_ENABLE, &ring::state(0, 1), &[])
            .unwrap();
        assert_not_spinning(sc.node.pid(), "pipe as kick fd");
        panic!("a pipe was accepted as a kick fd");
    }
    assert!(sc.log_has("kick fd is not an eventfd"), "{}", sc.node.log());
    drop(c);
    // A semaphore eventfd holding a huge count: accepted (an eventfd), but watched
    // edge-triggered, so it costs one pass, not a spin.
    let mut s = Session::start(&sc.sock, &Opts::default()).expect("setup");
    let sem =
        vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_SEMAPHORE).unwrap();
    sem.write(1 << 40).unwrap();
    s.restart(Some(sem.try_clone().unwrap())).unwrap();
    s.rings.read_request(0, 0x8000, 0);
    s.rings.publish(0);
    sem.write(1).unwrap();
    s.rings.wait_used(1);
    assert_not_spinning(sc.node.pid(), "semaphore eventfd as kick fd");
    sc.others_unharmed("kick fds that stay readable");
    drop(s);
    sc.detach_victim("kick fds that stay readable");
}

/// Values a frontend may not send: a vring base beyond 16 bits, protocol features that
/// were not offered, a vring size change while the ring runs. Each is nacked and costs
/// the frontend its connection.
#[test]
fn out_of_range_vring_values_are_refused() {
    let mut sc = Scene::new();
    let c = Conn::connect(&sc.sock);
    c.negotiate(0, 0).unwrap();
    let e = c
        .ack(FrontendReq::SET_VRING_BASE, &ring::state(0, 0x1_0000), &[])
        .unwrap_err();
    eprintln!("SET_VRING_BASE 65536: {e}");
    assert!(c.closed_within(Duration::from_secs(10)));

    let c = Conn::connect(&sc.sock);
    c.send(FrontendReq::SET_OWNER, 0, &[], &[]).unwrap();
    let f = c.get_u64(FrontendReq::GET_FEATURES).unwrap();
    c.send(FrontendReq::SET_FEATURES, 0, &ring::u64le(f), &[])
        .unwrap();
    let offered = c.get_u64(FrontendReq::GET_PROTOCOL_FEATURES).unwrap();
    let bogus = ring::P_REPLY_ACK | (1 << 62);
    assert_eq!(offered & (1 << 62), 0);
    let e = c
        .ack(FrontendReq::SET_PROTOCOL_FEATURES, &ring::u64le(bogus), &[])
        .unwrap_err();
    eprintln!("SET_PROTOCOL_FEATURES with a bit never offered: {e}");

    let s = Session::start(&sc.sock, &Opts::default()).expect("setup");
    let e = s
        .conn
        .ack(FrontendReq::SET_VRING_NUM, &ring::state(0, 32), &[])
        .unwrap_err();
    eprintln!("SET_VRING_NUM on a running ring: {e}");
    assert!(
        sc.log_has("SET_VRING_NUM on running vring 0"),
        "{}",
        sc.node.log()
    );
    sc.others_unharmed("out-of-range vring values");
    drop(s);
    sc.detach_victim("out-of-range vring values");
}

/// File descriptors attached to messages that take none are closed with the
/// connection; emberd's descriptor count stays where it was.
#[test]
fn fds_on_messages_that_take_none_do_not_leak() {
    let mut sc = Scene::new();
    let fd_count = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let before = fd_count(sc.node.pid());
    let evs: Vec<_> = (0..8)
        .map(|_| vmm_sys_util::eventfd::EventFd::new(0).unwrap())
        .collect();
    let raw: Vec<i32> = evs.iter().map(|e| e.as_raw_fd()).collect();
    for _ in 0..100 {
        let c = Conn::connect(&sc.sock);
        c.send(FrontendReq::GET_FEATURES, 0, &[], &raw).unwrap();
        assert!(c.closed_within(Duration::from_secs(10)));
    }
    // REM_MEM_REG may carry one fd (compatibility): it is closed unused (this one is
    // nacked, no such region, which ends the connection).
    for _ in 0..20 {
        let c = Conn::connect(&sc.sock);
        c.negotiate(0, ring::P_MEM_SLOTS).unwrap();
        let _ = c.ack(
            FrontendReq::REM_MEM_REG,
            &ring::single_region(0, 4096, ring::UADDR, 0),
            &raw[..1],
        );
        assert!(c.closed_within(Duration::from_secs(10)));
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = fd_count(sc.node.pid());
    eprintln!("emberd fds: {before} before, {after} after 120 messages with fds");
    assert!(after <= before + 4, "fds leaked: {before} → {after}");
    sc.others_unharmed("fds on messages that take none");
    sc.detach_victim("fds on messages that take none");
}
