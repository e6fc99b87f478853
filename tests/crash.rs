//! Crash tests with real clients (issue 11): `emberd serve` is killed with SIGKILL and
//! started again `EMBER_CRASH_CYCLES` times (default 50) while three real clients write,
//! and no write any of them saw acknowledged may be lost.
//!
//! One node, two volumes (1 GiB, directory pool):
//!
//! - `nbd-vol`, attached over NBD, is written by
//!   - **fio** (nbd engine, `verify=crc32c`, random 4 KiB writes at depth 8), two runs a
//!     cycle. One writes 8 MiB and ends before the kill (every write acknowledged); after
//!     the restart `fio --verify_only` reads every block back and all must be intact. The
//!     other writes until the daemon dies (its region: 32 MiB); fio's verify state
//!     (`verify_state_save`) lists what it wrote, and after the restart
//!     `fio --verify_only --verify_state_load` reads that back: only writes in flight at
//!     the kill may differ (those fio reported failed, or at most `iodepth` of them when
//!     fio ended on a transport error without saying which).
//!   - **a libnbd writer** (`nbdsh`) that writes sequence numbers into 64 slots of 4 KiB
//!     and appends each acknowledged number to a log; when the connection drops it
//!     reconnects to the same export and goes on. After each kill, with the daemon dead,
//!     the test reads the pool file: every slot holds the last acknowledged number for
//!     that slot or the one that was in flight, never an older one and never a torn block.
//! - `guest-vol`, attached over vhost-user to a QEMU guest (TCG, `tests/guest/`) whose
//!   chardev has `reconnect=1`, and over NBD to the test (for the stop marker). The guest
//!   loops over 16 slots of 256 KiB: check the slot still holds what it wrote 16 rounds
//!   earlier, write the new round with `O_DIRECT` + fsync, read it back; two background
//!   loops keep reads and writes in flight on both queues so kills land on requests in
//!   flight (QEMU resubmits them from its inflight area). Any I/O error, mismatch or lost
//!   round fails the guest's script; its `dmesg` must show no I/O error.
//!
//! A restart must serve the attachments again at the same endpoints (start-up
//! reconciliation, `control/src/volumes/reconcile.rs`), which is what lets every client
//! reconnect. Each cycle waits until every client made progress since the last restart,
//! so each kill hits running I/O. The test prints the cycles, the wall time, the restart
//! times and the work checked (`cargo test -p emberd --test crash -- --nocapture`).
//! Unless `RUST_LOG` is set, emberd runs with `ember_daemon::vhost::worker=debug`, so a
//! failure's log shows each vhost-user queue's state at its starts and stops.

mod common;
#[path = "guest/mod.rs"]
mod guest;

use common::serve::ServeNode;
use common::*;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Cycles when `EMBER_CRASH_CYCLES` is not set.
const DEFAULT_CYCLES: usize = 50;
/// Writer slots (4 KiB each) and where they start in `nbd-vol`.
const SLOTS: u64 = 64;
const WRITER_AT: u64 = 960 << 20;
/// Regions of the fio runs the kills interrupt: `REGIONS` of `REGION` bytes from offset
/// 0 of `nbd-vol`.
const REGION: u64 = 32 << 20;
const REGIONS: u64 = 16;
/// Regions of the fio runs that end before the kill: `DONES` of `DONE` bytes from
/// `DONE_AT`.
const DONE: u64 = 8 << 20;
const DONES: u64 = 32;
const DONE_AT: u64 = 512 << 20;
/// Where the stop marker goes in `guest-vol`.
const MARKER_AT: u64 = 512 << 20;
/// How long a client may take to make progress after a restart.
const PROGRESS: Duration = Duration::from_secs(300);

fn cycles() -> usize {
    std::env::var("EMBER_CRASH_CYCLES")
        .ok()
        .map(|v| v.parse().expect("EMBER_CRASH_CYCLES must be a number"))
        .unwrap_or(DEFAULT_CYCLES)
}

/// The libnbd writer (run by `nbdsh`; arguments in the environment).
const WRITER: &str = r#"
import os, struct, sys, time
uri = os.environ["W_URI"]; log = os.environ["W_LOG"]; stop = os.environ["W_STOP"]
slots = int(os.environ["W_SLOTS"]); base = int(os.environ["W_AT"])
def connect():
    t = time.time()
    while True:
        try:
            c = nbd.NBD()
            c.connect_uri(uri)
            return c
        except nbd.Error as e:
            if time.time() - t > 300:
                print("WRITER-GAVE-UP", e, file=sys.stderr, flush=True)
                sys.exit(3)
            time.sleep(0.05)
c = connect()
seq, reconnects = 1, 0
with open(log, "a") as f:
    while not os.path.exists(stop):
        slot = seq % slots
        try:
            c.pwrite(struct.pack("<Q", seq) * 512, base + slot * 4096)
        except nbd.Error as e:
            reconnects += 1
            c = connect()
            continue
        f.write("%d\n" % seq)
        f.flush()
        seq += 1
        time.sleep(0.002)
print("WRITER-DONE acked=%d reconnects=%d" % (seq - 1, reconnects), flush=True)
"#;

/// The guest's loop (see the module doc). Stops when the marker block holds data.
fn guest_script() -> String {
    format!(
        r#"
set -e
( while [ ! -f /tmp/stop ]; do dd if=/dev/vda of=/dev/null bs=1M skip=32 count=16 iflag=direct 2>/dev/null || echo BG-READ-ERROR; done ) &
( while [ ! -f /tmp/stop ]; do dd if=/dev/zero of=/dev/vda bs=64k seek=768 count=32 oflag=direct conv=fsync,notrunc 2>/dev/null || echo BG-WRITE-ERROR; done ) &
i=0
while :; do
    slot=$((i % 16))
    if [ $i -ge 16 ]; then
        yes "ember-$((i-16))" | head -c 262144 > /tmp/p
        dd if=/dev/vda of=/tmp/r bs=64k skip=$((slot*16)) count=4 iflag=direct 2>/dev/null || {{ echo "READ-ERROR $i"; exit 5; }}
        [ "$(md5sum < /tmp/r)" = "$(md5sum < /tmp/p)" ] || {{ echo "LOST $((i-16))"; exit 4; }}
    fi
    yes "ember-$i" | head -c 262144 > /tmp/p
    dd if=/tmp/p of=/dev/vda bs=64k seek=$((slot*16)) oflag=direct conv=fsync,notrunc 2>/dev/null || {{ echo "WRITE-ERROR $i"; exit 5; }}
    dd if=/dev/vda of=/tmp/r bs=64k skip=$((slot*16)) count=4 iflag=direct 2>/dev/null || {{ echo "READ-ERROR $i"; exit 5; }}
    [ "$(md5sum < /tmp/r)" = "$(md5sum < /tmp/p)" ] || {{ echo "MISMATCH $i"; exit 4; }}
    echo "ROUND $i"
    i=$((i+1))
    m=$(dd if=/dev/vda bs=4096 skip={marker} count=1 iflag=direct 2>/dev/null | tr -d '\000' | head -c 10)
    [ -z "$m" ] || break
done
touch /tmp/stop
wait
if dmesg | grep -i -E 'I/O error|blk_update_request|critical'; then echo "GUEST-IO-ERRORS"; exit 6; fi
echo "GUEST-LOOP-OK rounds=$i"
"#,
        marker = MARKER_AT / 4096
    )
}

fn yes_pattern(i: u64, len: usize) -> Vec<u8> {
    format!("ember-{i}\n").bytes().cycle().take(len).collect()
}

/// The last `ROUND n` the guest printed.
fn last_round(console: &str) -> Option<u64> {
    console
        .rsplit("ROUND ")
        .next()
        .filter(|_| console.contains("ROUND "))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
}

/// Acknowledged sequence numbers in the writer's log.
fn acked(log: &Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Check the writer's slots in `file` (daemon dead) against its log; returns how many
/// acknowledged writes the log holds.
fn check_writer(file: &Path, log: &Path) -> usize {
    let acks = acked(log);
    let top = acks.iter().copied().max().unwrap_or(0);
    let mut last: HashMap<u64, u64> = HashMap::new();
    for &s in &acks {
        last.insert(s % SLOTS, s);
    }
    let data = std::fs::read(file).expect("read the pool file");
    for slot in 0..SLOTS {
        let at = (WRITER_AT + slot * 4096) as usize;
        let block = &data[at..at + 4096];
        let word = u64::from_le_bytes(block[..8].try_into().expect("8 bytes"));
        assert!(
            block.chunks(8).all(|c| c == &block[..8]),
            "writer slot {slot}: torn block (first word {word})"
        );
        let want = last.get(&slot).copied().unwrap_or(0);
        // Acknowledged, or the one write in flight (the next number) when the kill came.
        assert!(
            word == want || (word > want && word % SLOTS == slot && word <= top + 1),
            "writer slot {slot}: holds {word}, but {want} was acknowledged (last ack {top})"
        );
    }
    acks.len()
}

/// What a fio run does.
#[derive(Clone, Copy, PartialEq)]
enum Fio {
    /// Write `DONE` bytes once (ends before the kill: every write acknowledged).
    Done,
    /// Write until the daemon is killed, saving fio's verify state.
    Killed,
    /// Read back and check every block a `Done` run wrote.
    VerifyDone,
    /// Read back and check what the `Killed` run's saved state lists.
    VerifyKilled,
}

/// One fio run of cycle `cycle` in its own directory (its verify state lives there).
fn fio(dir: &Path, uri: &str, cycle: usize, mode: Fio) -> Command {
    let done = matches!(mode, Fio::Done | Fio::VerifyDone);
    let (offset, size) = if done {
        (DONE_AT + (cycle as u64 % DONES) * DONE, DONE)
    } else {
        ((cycle as u64 % REGIONS) * REGION, REGION)
    };
    let mut c = Command::new("fio");
    c.current_dir(dir).args([
        if done { "--name=done" } else { "--name=killed" },
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=8",
        &format!("--offset={offset}"),
        &format!("--size={size}"),
        "--verify=crc32c",
        "--randrepeat=1",
        &format!("--randseed={}", 1000 + cycle),
    ]);
    match mode {
        Fio::Done => c.args(["--do_verify=0", "--verify_state_save=0"]),
        Fio::Killed => c.args([
            "--do_verify=0",
            "--verify_state_save=1",
            "--time_based",
            "--runtime=600",
        ]),
        Fio::VerifyDone => c.args(["--verify_only=1"]),
        Fio::VerifyKilled => c.args(["--verify_only=1", "--verify_state_load=1"]),
    };
    c
}

/// Run fio to the end; (success, stdout and stderr).
fn fio_run(dir: &Path, uri: &str, cycle: usize, mode: Fio) -> (bool, String) {
    let o = fio(dir, uri, cycle, mode).output().expect("spawn fio");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

/// Offsets named `offset=N` (io_u errors) or `offset N` (verify failures) in fio's output.
fn offsets(text: &str, marker: &str) -> BTreeSet<u64> {
    text.lines()
        .filter(|l| l.contains(marker))
        .filter_map(|l| {
            let rest = l.split("offset").nth(1)?;
            let digits: String = rest
                .trim_start_matches(['=', ' '])
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            digits.parse().ok()
        })
        .collect()
}

/// `issued rwts: total=R,W,...`: (reads, writes).
fn issued(text: &str) -> (u64, u64) {
    text.split("issued rwts: total=")
        .nth(1)
        .and_then(|s| {
            let mut it = s.split(',').map(|n| n.trim().parse::<u64>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((0, 0))
}

fn wait_child(c: &mut Child, t: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    while t0.elapsed() < t {
        if let Ok(Some(s)) = c.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[test]
fn sigkill_restart_cycles_lose_no_acknowledged_write() {
    for t in ["fio", "nbdsh", "qemu-io", "qemu-system-x86_64", "cpio"] {
        require_tool(t);
    }
    let cycles = cycles();
    // The vhost-user queues log their state at each start and stop (debug): what a
    // guest stall is diagnosed by (the panic below prints the daemon's log).
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "info,ember_daemon::vhost::worker=debug");
    }
    let g = guest::Guest::get();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut node = ServeNode::start(dir.path(), &[]);
    let pool = node.data.join("pools").join("default");
    let nbd_vol = node.volume("nbd-vol", 1, None);
    let guest_vol = node.volume("guest-vol", 1, None);
    let nbd_uri = node.attach(&nbd_vol, "nbd")["uri"]
        .as_str()
        .expect("uri")
        .to_string();
    let marker_uri = node.attach(&guest_vol, "nbd")["uri"]
        .as_str()
        .expect("uri")
        .to_string();
    let vhost = node.attach(&guest_vol, "vhost-user");
    let sock = PathBuf::from(vhost["socket_path"].as_str().expect("socket_path"));

    // The guest.
    let initrd = g.initrd(dir.path(), &guest_script());
    let mut args = guest::base_args(&g, &initrd, 512);
    args.extend(guest::vhost_blk_args("c0", &sock, 2, true));
    let mut q = guest::Qemu::spawn(dir.path(), &args);
    q.wait_for("ROUND 1", PROGRESS);

    // The libnbd writer.
    let wlog = dir.path().join("writer.log");
    let wstop = dir.path().join("writer.stop");
    let wscript = dir.path().join("writer.py");
    std::fs::write(&wscript, WRITER).expect("write the writer");
    // nbdsh runs `python3 -m nbd`: Debian's python3 (python3-libnbd) must come first.
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let mut writer = Command::new("nbdsh")
        .env("PATH", path)
        .args(["-c", &format!("exec(open({:?}).read())", wscript)])
        .env("W_URI", &nbd_uri)
        .env("W_LOG", &wlog)
        .env("W_STOP", &wstop)
        .env("W_SLOTS", SLOTS.to_string())
        .env("W_AT", WRITER_AT.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nbdsh");

    let t0 = Instant::now();
    let mut restarts = Vec::new();
    let (mut fio_verified, mut fio_unacked, mut fio_done) = (0u64, 0usize, 0u64);
    for cycle in 0..cycles {
        let cdir = dir.path().join(format!("fio-{cycle}"));
        std::fs::create_dir_all(&cdir).expect("fio dir");
        let round0 = last_round(&q.console_text()).unwrap_or(0);
        let acks0 = acked(&wlog).len();
        // A run that ends before the kill: all its writes are acknowledged.
        let (ok, text) = fio_run(&cdir, &nbd_uri, cycle, Fio::Done);
        assert!(ok, "cycle {cycle}: fio failed before the kill:\n{text}");
        let flog = cdir.join("killed.log");
        let fout = std::fs::File::create(&flog).expect("fio log");
        let mut f = fio(&cdir, &nbd_uri, cycle, Fio::Killed)
            .stdout(fout.try_clone().expect("dup"))
            .stderr(fout)
            .spawn()
            .expect("spawn fio");
        // Every client made progress since the restart (fio has been writing for a
        // while): the kill hits running I/O.
        let t = Instant::now();
        let mut fio_since = None;
        loop {
            let round = last_round(&q.console_text()).unwrap_or(0);
            if fio_since.is_none()
                && std::fs::read_to_string(&flog)
                    .unwrap_or_default()
                    .contains("connected to NBD server")
            {
                fio_since = Some(Instant::now());
            }
            let fio_busy = fio_since.is_some_and(|s| s.elapsed() > Duration::from_millis(700));
            if round > round0 && acked(&wlog).len() > acks0 + 10 && fio_busy {
                break;
            }
            if let Ok(Some(st)) = q.child.try_wait() {
                panic!("QEMU exited ({st}); console:\n{}", q.console_text());
            }
            if let Ok(Some(st)) = writer.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = writer.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                panic!("the writer exited ({st}): {err}");
            }
            assert!(
                t.elapsed() < PROGRESS,
                "cycle {cycle}: no progress (guest round {round} from {round0}, writer acks {} from {acks0})\n{}",
                acked(&wlog).len(),
                node.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // A little jitter so kills land at different points of the clients' loops.
        std::thread::sleep(Duration::from_millis(37 * (cycle as u64 % 11)));
        node.kill();
        // Daemon dead: what is on disk now is what survived.
        check_writer(&pool.join(format!("{nbd_vol}.img")), &wlog);
        let fst = wait_child(&mut f, Duration::from_secs(120));
        if fst.is_none() {
            let _ = f.kill();
        }
        let _ = f.wait();
        let wtext = std::fs::read_to_string(&flog).unwrap_or_default();
        let failed = offsets(&wtext, "io_u error");
        let restart = Instant::now();
        node.start_again();
        restarts.push(restart.elapsed().as_secs_f64());
        // Every write of the run that ended before the kill reads back intact.
        let (ok, text) = fio_run(&cdir, &nbd_uri, cycle, Fio::VerifyDone);
        let (reads, _) = issued(&text);
        assert!(
            ok && reads == DONE / 4096,
            "cycle {cycle}: acknowledged fio writes lost or corrupt ({reads} blocks read):\n{text}"
        );
        fio_done += reads;
        // The killed run: every write its saved state lists is read back. Only writes
        // in flight at the kill may differ: those fio reported failed, or, when fio's
        // state could not tell (it sometimes ends with a transport error and no
        // per-write failure), at most `iodepth` of them.
        let (_, vtext) = fio_run(&cdir, &nbd_uri, cycle, Fio::VerifyKilled);
        let bad = offsets(&vtext, "verify");
        let (reads, _) = issued(&vtext);
        let (_, writes) = issued(&wtext);
        assert!(
            bad.is_subset(&failed) || bad.len() <= 8,
            "cycle {cycle}: fio found acknowledged writes lost or corrupt at {:?}\nwrite run:\n{wtext}\nverify run:\n{vtext}",
            bad.difference(&failed).collect::<Vec<_>>()
        );
        // A run that wrapped around its region is checked once per block (the last
        // write there).
        let blocks = writes.min(REGION / 4096);
        assert!(
            reads > 0 && reads + 16 >= blocks,
            "cycle {cycle}: fio verified {reads} of {writes} writes\n{vtext}"
        );
        fio_verified += reads;
        fio_unacked += bad.len();
        eprintln!(
            "cycle {cycle}: restart {:.2} s, fio: {} written and verified before the kill, {writes} written by the killed run, {reads} verified ({} in flight at the kill differ), guest round {}, writer acks {}",
            restarts[cycle],
            DONE / 4096,
            bad.len(),
            last_round(&q.console_text()).unwrap_or(0),
            acked(&wlog).len()
        );
    }
    let wall = t0.elapsed();

    // Stop the clients and check what is left.
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        &format!("write -P 83 {MARKER_AT} 4096"),
        &marker_uri,
    ]));
    let (rc, console) = q.wait_exit(PROGRESS);
    assert_eq!(
        rc,
        0,
        "guest loop failed across restarts; console:\n{console}\nemberd log:\n{}",
        node.log()
    );
    assert!(console.contains("GUEST-LOOP-OK"), "{console}");
    for bad in ["BG-READ-ERROR", "BG-WRITE-ERROR"] {
        assert!(!console.contains(bad), "{bad} in the guest:\n{console}");
    }
    std::fs::write(&wstop, b"").expect("stop the writer");
    assert!(
        wait_child(&mut writer, Duration::from_secs(60)).is_some(),
        "the writer did not stop"
    );
    let wout = writer.wait_with_output().expect("writer output");
    let wtext = String::from_utf8_lossy(&wout.stdout).to_string();
    assert!(
        wout.status.success(),
        "writer: {wtext}{}",
        String::from_utf8_lossy(&wout.stderr)
    );
    let rounds = last_round(&console).unwrap_or(0);
    node.daemon.terminate(Duration::from_secs(60));
    let acks = check_writer(&pool.join(format!("{nbd_vol}.img")), &wlog);
    // The guest's last 16 rounds are on the host.
    let data = std::fs::read(pool.join(format!("{guest_vol}.img"))).expect("guest volume");
    for i in rounds.saturating_sub(15)..=rounds {
        let at = ((i % 16) << 20) as usize;
        assert!(
            data[at..at + 262_144] == yes_pattern(i, 262_144)[..],
            "guest round {i} on the host"
        );
    }
    let log = node.log();
    let resubmitted = log.matches("recovered in-flight requests").count();
    let restored = log.matches("attachment served again").count();
    assert!(
        restored >= 3 * cycles,
        "{restored} attachments served again over {cycles} restarts"
    );
    eprintln!(
        "crash test: {cycles} SIGKILL/restart cycles in {:.0} s ({:.1} s per cycle); restart median {:.2} s, max {:.2} s; \
         fio: {fio_done} writes of finished runs verified after the kills, {fio_verified} of killed runs verified ({fio_unacked} in flight at the kills differed); writer: {acks} acknowledged writes checked after every kill, {}; \
         guest: {rounds} rounds, 0 I/O errors; restarts that resubmitted guest requests in flight: {resubmitted}",
        wall.as_secs_f64(),
        wall.as_secs_f64() / cycles.max(1) as f64,
        median(&mut restarts.clone()),
        restarts.iter().copied().fold(0.0, f64::max),
        wtext.trim(),
    );
}
