//! vhost-user-blk end-to-end tests with real frontends.
//!
//! - blkio (Rust libblkio, driver `virtio-blk-vhost-user`) as an in-process client against
//!   a running `emberd export --vhost-user`: data, flush, discard, write-zeroes, several
//!   queues, read-only refusal.
//! - QEMU guests (TCG) built by `tests/guest/build.sh`: see `guest_*` tests.

mod common;
#[path = "guest/mod.rs"]
mod guest;

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};
use common::*;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const SIZE: u64 = 64 << 20;

struct Export {
    _dir: tempfile::TempDir,
    file: PathBuf,
    sock: PathBuf,
    daemon: Daemon,
}

fn export(extra: &[&str]) -> Export {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    sparse_file(&file, SIZE);
    let sock = dir.path().join("vhost.sock");
    let mut args = vec![
        "export",
        "--file",
        file.to_str().unwrap(),
        "--vhost-user",
        sock.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let daemon = Daemon::spawn(dir.path(), &args);
    wait_for_path(&sock, Duration::from_secs(30));
    Export {
        _dir: dir,
        file,
        sock,
        daemon,
    }
}

/// Boot the guest with `script` as its `/test.sh` and the export as its disk, over
/// `num_queues` vhost-user queues (`reconnect`: QEMU reconnects when emberd restarts).
fn boot_guest(e: &Export, script: &str, num_queues: u16, reconnect: bool) -> guest::Qemu {
    let g = guest::Guest::get();
    let dir = e.file.parent().unwrap();
    let initrd = g.initrd(dir, script);
    let mut args = guest::base_args(&g, &initrd, 512);
    args.extend(guest::vhost_blk_args("c0", &e.sock, num_queues, reconnect));
    guest::Qemu::spawn(dir, &args)
}

/// Wait up to `timeout` for the guest's script to end; panics, with the console and
/// emberd's log, unless it exited 0. Returns the console.
fn guest_ok(q: &mut guest::Qemu, timeout: Duration, e: &Export) -> String {
    let (rc, console) = q.wait_exit(timeout);
    assert_eq!(
        rc,
        0,
        "guest script failed; console:\n{console}\nemberd log:\n{}",
        e.daemon.log_text()
    );
    console
}

/// A connected blkio client with one mapped memory region.
struct Client {
    b: Blkio,
    queues: Vec<Blkioq>,
    region: MemoryRegion,
}

impl Client {
    fn connect(sock: &Path, num_queues: i32, read_only: bool) -> Client {
        let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
        b.set_str("path", sock.to_str().unwrap()).unwrap();
        if read_only {
            b.set_bool("read-only", true).unwrap();
        }
        b.connect()
            .unwrap_or_else(|e| panic!("blkio connect: {e:?}"));
        b.set_i32("num-queues", num_queues).unwrap();
        let out = b.start().unwrap_or_else(|e| panic!("blkio start: {e:?}"));
        let region = b.alloc_mem_region(16 << 20).unwrap();
        b.map_mem_region(&region).unwrap();
        Client {
            b,
            queues: out.queues,
            region,
        }
    }

    fn buf(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.region.len);
        // SAFETY: the region is mapped read-write for the client's lifetime; tests never
        // hold two overlapping slices while I/O runs on them.
        unsafe { std::slice::from_raw_parts_mut((self.region.addr + off) as *mut u8, len) }
    }

    /// Wait for `n` completions on queue `q`; returns their (user_data, ret).
    fn wait(&mut self, q: usize, n: usize) -> Vec<(usize, i32)> {
        let mut out = Vec::new();
        let mut comps: Vec<MaybeUninit<blkio::Completion>> =
            (0..n).map(|_| MaybeUninit::uninit()).collect();
        while out.len() < n {
            let want = n - out.len();
            let mut timeout = Duration::from_secs(60);
            let got = self.queues[q]
                .do_io(&mut comps[..want], want, Some(&mut timeout), None)
                .unwrap_or_else(|e| panic!("do_io: {e:?}"));
            assert!(got > 0, "no completion within 60 s");
            for c in &comps[..got] {
                // SAFETY: do_io initialised the first `got` entries.
                let c = unsafe { c.assume_init_ref() };
                out.push((c.user_data, c.ret));
            }
        }
        out
    }

    fn sync_op(&mut self, q: usize, f: impl FnOnce(&mut Blkioq)) -> i32 {
        f(&mut self.queues[q]);
        self.wait(q, 1)[0].1
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.b.unmap_mem_region(&self.region);
        self.b.free_mem_region(&self.region);
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn blkio_pattern_write_flush_read() {
    let e = export(&[]);
    let mut c = Client::connect(&e.sock, 1, false);
    assert_eq!(c.b.get_u64("capacity").unwrap(), SIZE);
    // 16 writes of 64 KiB in one batch (QD16), then flush.
    let chunk = 64 << 10;
    let data = pattern(1, 16 * chunk);
    c.buf(0, data.len()).copy_from_slice(&data);
    for i in 0..16 {
        let p = (c.region.addr + i * chunk) as *const u8;
        c.queues[0].write((i * chunk) as u64 * 3, p, chunk, i, ReqFlags::empty());
    }
    for (tag, ret) in c.wait(0, 16) {
        assert_eq!(ret, 0, "write {tag} failed");
    }
    assert_eq!(c.sync_op(0, |q| q.flush(99, ReqFlags::empty())), 0);
    // Read back into a different part of the region.
    let base = 8 << 20;
    c.buf(base, data.len()).fill(0);
    for i in 0..16 {
        let p = (c.region.addr + base + i * chunk) as *mut u8;
        c.queues[0].read((i * chunk) as u64 * 3, p, chunk, i, ReqFlags::empty());
    }
    for (tag, ret) in c.wait(0, 16) {
        assert_eq!(ret, 0, "read {tag} failed");
    }
    assert!(c.buf(base, data.len()) == &data[..], "read back differs");
    // And the host file holds the same bytes.
    let file = std::fs::read(&e.file).unwrap();
    for i in 0..16 {
        let at = i * chunk * 3;
        assert!(
            file[at..at + chunk] == data[i * chunk..(i + 1) * chunk],
            "file chunk {i}"
        );
    }
    // FUA writes work too.
    let p = c.region.addr as *const u8;
    assert_eq!(c.sync_op(0, |q| q.write(0, p, 4096, 1, ReqFlags::FUA)), 0);
    // Out of range is an error, and the daemon lives on.
    let p = (c.region.addr + base) as *mut u8;
    assert_ne!(
        c.sync_op(0, |q| q.read(SIZE, p, 4096, 2, ReqFlags::empty())),
        0
    );
    assert_eq!(
        c.sync_op(0, |q| q.read(0, p, 4096, 3, ReqFlags::empty())),
        0
    );
    drop(c);
    assert!(e.daemon.log_text().is_empty() || !e.daemon.log_text().contains("panicked"));
}

#[test]
fn blkio_discard_and_write_zeroes() {
    let e = export(&[]);
    let mut c = Client::connect(&e.sock, 1, false);
    let len = 1 << 20;
    let data = pattern(2, len);
    c.buf(0, len).copy_from_slice(&data);
    let p = c.region.addr as *const u8;
    assert_eq!(
        c.sync_op(0, |q| q.write(0, p, len, 0, ReqFlags::empty())),
        0
    );
    // Zero 64 KiB at 128 KiB (with and without unmap), discard 256 KiB at 512 KiB.
    assert_eq!(
        c.sync_op(0, |q| q.write_zeroes(
            128 << 10,
            64 << 10,
            1,
            ReqFlags::empty()
        )),
        0
    );
    assert_eq!(
        c.sync_op(0, |q| q.write_zeroes(
            320 << 10,
            64 << 10,
            1,
            ReqFlags::NO_UNMAP
        )),
        0
    );
    assert_eq!(
        c.sync_op(0, |q| q.discard(512 << 10, 256 << 10, 2, ReqFlags::empty())),
        0
    );
    let base = 4 << 20;
    let r = (c.region.addr + base) as *mut u8;
    assert_eq!(c.sync_op(0, |q| q.read(0, r, len, 3, ReqFlags::empty())), 0);
    let got = c.buf(base, len).to_vec();
    let mut want = data.clone();
    want[128 << 10..192 << 10].fill(0);
    want[320 << 10..384 << 10].fill(0);
    want[512 << 10..768 << 10].fill(0);
    assert!(
        got == want,
        "zeroed/discarded ranges do not read back as expected"
    );
}

#[test]
fn blkio_multi_queue() {
    let e = export(&["--num-queues", "2"]);
    let mut c = Client::connect(&e.sock, 2, false);
    assert_eq!(c.queues.len(), 2);
    let chunk = 128 << 10;
    let data = pattern(3, 32 * chunk);
    c.buf(0, data.len()).copy_from_slice(&data);
    // Interleave writes over both queues, then reap both.
    for i in 0..32 {
        let p = (c.region.addr + i * chunk) as *const u8;
        c.queues[i % 2].write((i * chunk) as u64, p, chunk, i, ReqFlags::empty());
    }
    let mut done = c.wait(0, 16);
    done.extend(c.wait(1, 16));
    assert!(done.iter().all(|&(_, r)| r == 0), "{done:?}");
    // Read back: even chunks via queue 1, odd via queue 0.
    let base = 8 << 20;
    for i in 0..32 {
        let p = (c.region.addr + base + i * chunk) as *mut u8;
        c.queues[(i + 1) % 2].read((i * chunk) as u64, p, chunk, i, ReqFlags::empty());
    }
    let mut done = c.wait(0, 16);
    done.extend(c.wait(1, 16));
    assert!(done.iter().all(|&(_, r)| r == 0), "{done:?}");
    assert!(c.buf(base, data.len()) == &data[..]);
}

#[test]
fn blkio_read_only_export_refuses_writes() {
    let e = export(&["--read-only"]);
    std::fs::write(&e.file, pattern(4, 4096)).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&e.file)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let mut c = Client::connect(&e.sock, 1, true);
    assert!(c.b.get_bool("read-only").unwrap());
    let p = c.region.addr as *mut u8;
    assert_eq!(
        c.sync_op(0, |q| q.read(0, p, 4096, 0, ReqFlags::empty())),
        0
    );
    assert!(c.buf(0, 4096) == &pattern(4, 4096)[..]);
    assert_ne!(
        c.sync_op(0, |q| q.write(0, p, 4096, 1, ReqFlags::empty())),
        0
    );
    assert_ne!(
        c.sync_op(0, |q| q.discard(0, 4096, 2, ReqFlags::empty())),
        0
    );
    assert_eq!(
        std::fs::read(&e.file).unwrap()[..4096],
        pattern(4, 4096)[..]
    );
}

#[test]
fn blkio_reconnects_to_a_running_export() {
    let e = export(&[]);
    for round in 0..3u64 {
        let mut c = Client::connect(&e.sock, 1, false);
        let data = pattern(10 + round, 4096);
        c.buf(0, 4096).copy_from_slice(&data);
        let p = c.region.addr as *mut u8;
        assert_eq!(
            c.sync_op(0, |q| q.write(round * 4096, p, 4096, 0, ReqFlags::empty())),
            0
        );
        c.buf(0, 4096).fill(0);
        assert_eq!(
            c.sync_op(0, |q| q.read(round * 4096, p, 4096, 0, ReqFlags::empty())),
            0
        );
        assert!(c.buf(0, 4096) == &data[..], "round {round}");
        drop(c);
        // The listener re-binds the socket for the next frontend.
        wait_for_path(&e.sock, Duration::from_secs(30));
    }
}

/// The bytes `yes "ember-$i" | head -c $len` produces in the guest.
fn yes_pattern(i: u32, len: usize) -> Vec<u8> {
    format!("ember-{i}\n").bytes().cycle().take(len).collect()
}

/// Guest script: four 1 MiB patterns written in parallel (both queues busy) with
/// O_DIRECT at 1..4 MiB, read back and compared, 2 MiB discarded and read as zeros.
const GUEST_IO: &str = r#"
set -e
serial=$(cat /sys/block/vda/serial)
[ "$serial" = "vol-guest" ] || { echo "BAD-SERIAL $serial"; exit 3; }
for i in 1 2 3 4; do yes "ember-$i" | head -c 1048576 > /tmp/p$i; done
for i in 1 2 3 4; do
    dd if=/tmp/p$i of=/dev/vda bs=64k seek=$((i*16)) oflag=direct conv=notrunc 2>/dev/null &
done
wait
for i in 1 2 3 4; do
    dd if=/dev/vda of=/tmp/r bs=64k skip=$((i*16)) count=16 iflag=direct 2>/dev/null
    [ "$(md5sum < /tmp/r)" = "$(md5sum < /tmp/p$i)" ] || { echo "MISMATCH $i"; exit 4; }
done
blkdiscard -o 2097152 -l 1048576 /dev/vda
dd if=/dev/vda of=/tmp/r bs=64k skip=32 count=16 iflag=direct 2>/dev/null
[ "$(md5sum < /tmp/r)" = "$(head -c 1048576 /dev/zero | md5sum)" ] || { echo "DISCARD-NOT-ZERO"; exit 5; }
echo GUEST-IO-OK
"#;

#[test]
fn guest_qemu_dd_checksums_and_discard() {
    require_tool("qemu-system-x86_64");
    let e = export(&["--num-queues", "2", "--name", "vol-guest"]);
    let mut q = boot_guest(&e, GUEST_IO, 2, false);
    let console = guest_ok(&mut q, Duration::from_secs(600), &e);
    assert!(console.contains("GUEST-IO-OK"));
    // The host file holds what the guest wrote.
    let file = std::fs::read(&e.file).unwrap();
    let mib = 1 << 20;
    for i in [1u32, 3, 4] {
        let at = i as usize * mib;
        assert!(
            file[at..at + mib] == yes_pattern(i, mib)[..],
            "pattern {i} on the host"
        );
    }
    assert!(
        file[2 * mib..3 * mib].iter().all(|&b| b == 0),
        "discarded range"
    );
}

/// Guest script for the restart test: a write+verify loop over 16 slots of 1 MiB, with
/// a progress line per round; any I/O error or mismatch fails the script.
const GUEST_LOOP: &str = r#"
set -e
# Background readers keep requests in flight on both queues, so a kill hits some.
( while [ ! -f /tmp/stop ]; do dd if=/dev/vda of=/dev/null bs=1M skip=32 count=16 iflag=direct 2>/dev/null || echo BG-READ-ERROR; done ) &
( while [ ! -f /tmp/stop ]; do dd if=/dev/zero of=/dev/vda bs=64k seek=768 count=32 oflag=direct conv=fsync,notrunc 2>/dev/null || echo BG-WRITE-ERROR; done ) &
i=0
while [ $i -lt 60 ]; do
    slot=$((i % 16))
    yes "ember-$i" | head -c 262144 > /tmp/p
    dd if=/tmp/p of=/dev/vda bs=64k seek=$((slot*16)) oflag=direct conv=fsync,notrunc 2>/dev/null
    dd if=/dev/vda of=/tmp/r bs=64k skip=$((slot*16)) count=4 iflag=direct 2>/dev/null
    [ "$(md5sum < /tmp/r)" = "$(md5sum < /tmp/p)" ] || { echo "MISMATCH $i"; exit 4; }
    echo "ROUND $i"
    i=$((i+1))
done
touch /tmp/stop
wait
if dmesg | grep -i -E 'I/O error|blk_update_request|critical'; then echo "GUEST-IO-ERRORS"; exit 6; fi
echo GUEST-LOOP-OK
"#;

#[test]
fn guest_survives_emberd_sigkill_and_restart() {
    require_tool("qemu-system-x86_64");
    let mut e = export(&["--num-queues", "2", "--name", "vol-restart"]);
    let dir = e.file.parent().unwrap().to_path_buf();
    let mut q = boot_guest(&e, GUEST_LOOP, 2, true);
    let file = e.file.to_str().unwrap().to_string();
    let sock = e.sock.to_str().unwrap().to_string();
    for (n, round) in ["ROUND 8", "ROUND 20", "ROUND 32"].iter().enumerate() {
        q.wait_for(round, Duration::from_secs(600));
        // Kill while the guest is in the middle of its loop, then come back.
        e.daemon.signal(libc::SIGKILL);
        e.daemon
            .wait_exit(Duration::from_secs(30))
            .expect("emberd did not die");
        std::thread::sleep(Duration::from_millis(300 * (n as u64 + 1)));
        e.daemon = Daemon::spawn(
            &dir,
            &[
                "export",
                "--file",
                &file,
                "--vhost-user",
                &sock,
                "--num-queues",
                "2",
                "--name",
                "vol-restart",
            ],
        );
    }
    let console = guest_ok(&mut q, Duration::from_secs(900), &e);
    assert!(console.contains("GUEST-LOOP-OK"));
    assert!(
        !console.contains("BG-READ-ERROR"),
        "background reads failed:\n{console}"
    );
    assert!(
        !console.contains("BG-WRITE-ERROR"),
        "background writes failed:\n{console}"
    );
    // Whether a kill caught requests in flight is up to timing; the log says (the inflight
    // region logic itself is unit-tested in daemon/src/vhost/inflight.rs).
    let recovered = e
        .daemon
        .log_text()
        .matches("recovered in-flight requests")
        .count();
    eprintln!("restarts that resubmitted in-flight requests: {recovered}");
    // The last 16 rounds' data is on the host.
    let data = std::fs::read(&e.file).unwrap();
    for i in 44..60u32 {
        let at = (i as usize % 16) << 20;
        assert!(
            data[at..at + 262_144] == yes_pattern(i, 262_144)[..],
            "round {i} on the host"
        );
    }
}

/// Guest half of the cross-protocol test: check what the host wrote over NBD at 4 MiB
/// (0xcd), write 0xab at 1 MiB for the host to read over NBD.
const GUEST_CROSS: &str = r#"
set -e
dd if=/dev/vda of=/tmp/r bs=64k skip=64 count=16 iflag=direct 2>/dev/null
[ "$(md5sum < /tmp/r)" = "$(head -c 1048576 /dev/zero | tr '\0' '\315' | md5sum)" ] || { echo "NBD-WRITE-NOT-SEEN"; exit 4; }
head -c 1048576 /dev/zero | tr '\0' '\253' > /tmp/p
dd if=/tmp/p of=/dev/vda bs=64k seek=16 oflag=direct conv=fsync,notrunc 2>/dev/null
echo GUEST-CROSS-OK
"#;

#[test]
fn guest_vhost_and_nbd_share_one_volume() {
    require_tool("qemu-system-x86_64");
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let nbd_sock = dir.path().join("nbd.sock");
    let nbd_arg = format!("unix:{}", nbd_sock.display());
    let e = export(&["--nbd", &nbd_arg, "--name", "vol-x"]);
    wait_for_path(&nbd_sock, Duration::from_secs(30));
    let url = format!("nbd+unix:///vol-x?socket={}", nbd_sock.display());
    // Host → guest: write over NBD before the guest boots.
    run_ok(Command::new("qemu-io").args(["-f", "raw", &url, "-c", "write -P 0xcd 4M 1M"]));
    let mut q = boot_guest(&e, GUEST_CROSS, 1, false);
    guest_ok(&mut q, Duration::from_secs(600), &e);
    // Guest → host: read the guest's write over NBD.
    let out = run_ok(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        &url,
        "-c",
        "read -P 0xab 1M 1M",
        "-c",
        "read -P 0 2M 2M",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Pattern verification failed"), "{text}");
}

mod raw {
    //! A hand-rolled vhost-user frontend (the `vhost` crate's `Frontend`) that puts
    //! malformed requests in the ring and sends a bad memory table.

    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::os::fd::FromRawFd;
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
    use vm_memory::{
        Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
    };
    use vmm_sys_util::eventfd::EventFd;

    pub const MEM: usize = 1 << 20;
    pub const QSIZE: u16 = 32;
    pub const DESC: u64 = 0;
    pub const AVAIL: u64 = 0x1000;
    pub const USED: u64 = 0x2000;

    pub fn memfd(len: usize) -> File {
        // SAFETY: valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd we own.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len as u64).unwrap();
        f
    }

    pub fn region(f: &File, gpa: u64, len: usize) -> GuestRegionMmap<()> {
        let m = MmapRegion::from_file(FileOffset::new(f.try_clone().unwrap(), 0), len).unwrap();
        GuestRegionMmap::new(m, GuestAddress(gpa)).unwrap()
    }

    /// How a connection sets up inflight tracking.
    pub enum Inflight {
        None,
        /// GET_INFLIGHT_FD then SET_INFLIGHT_FD (a first connection).
        Get,
        /// SET_INFLIGHT_FD with an area kept from before (a reconnection).
        Set(VhostUserInflight, File),
    }

    pub struct Guest {
        pub mem: GuestMemoryMmap<()>,
        pub kick: EventFd,
        pub mem_file: File,
        pub inflight: Option<(VhostUserInflight, File)>,
        // Kept open for the connection's lifetime.
        _region: Arc<GuestRegionMmap<()>>,
        _fe: Frontend,
        _call: EventFd,
        pub next_desc: u16,
        pub avail_idx: u16,
    }

    impl Guest {
        pub fn connect(sock: &std::path::Path) -> Guest {
            Guest::setup(sock, memfd(MEM), Inflight::None)
        }

        /// Connect with guest memory `f` (which may hold rings from an earlier
        /// connection: the vring base is the current used index, as QEMU does after a
        /// backend crash) and the given inflight setup.
        pub fn setup(sock: &std::path::Path, f: File, inflight: Inflight) -> Guest {
            let region = Arc::new(region(&f, 0, MEM));
            let mem = GuestMemoryMmap::from_arc_regions(vec![region.clone()]).unwrap();
            let mut fe = Frontend::connect(sock, 1).unwrap();
            fe.set_owner().unwrap();
            let features = fe.get_features().unwrap();
            // Keep it simple: no EVENT_IDX, no indirect descriptors.
            fe.set_features(features & !(1 << 29) & !(1 << 28)).unwrap();
            let pf = fe.get_protocol_features().unwrap();
            assert!(pf.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
            fe.set_protocol_features(
                VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::INFLIGHT_SHMFD,
            )
            .unwrap();
            // Wait for the backend's ack of every message (so "enabled" means running).
            fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
            let info = VhostUserMemoryRegionInfo::from_guest_region(&region).unwrap();
            fe.set_mem_table(&[info]).unwrap();
            let va = region.as_ptr() as u64;
            fe.set_vring_num(0, QSIZE).unwrap();
            fe.set_vring_addr(
                0,
                &VringConfigData {
                    queue_max_size: QSIZE,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: va + DESC,
                    used_ring_addr: va + USED,
                    avail_ring_addr: va + AVAIL,
                    log_addr: None,
                },
            )
            .unwrap();
            let inflight = match inflight {
                Inflight::None => None,
                Inflight::Get => {
                    let want = VhostUserInflight::new(0, 0, 1, QSIZE);
                    let (info, file) = fe.get_inflight_fd(&want).unwrap();
                    fe.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
                    Some((info, file))
                }
                Inflight::Set(info, file) => {
                    fe.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
                    Some((info, file))
                }
            };
            let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
            let avail_idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
            fe.set_vring_base(0, used).unwrap();
            let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            fe.set_vring_call(0, &call).unwrap();
            fe.set_vring_kick(0, &kick).unwrap();
            fe.set_vring_enable(0, true).unwrap();
            Guest {
                mem,
                kick,
                mem_file: f,
                inflight,
                _region: region,
                _fe: fe,
                _call: call,
                next_desc: 0,
                avail_idx,
            }
        }

        /// Put a chain of (addr, len, device-writable) in the ring; returns its head.
        pub fn push(&mut self, chain: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, write)) in chain.iter().enumerate() {
                let idx = self.next_desc;
                let last = i + 1 == chain.len();
                let flags: u16 = if last { 0 } else { 1 } | if write { 2 } else { 0 };
                let at = DESC + u64::from(idx) * 16;
                let m = &self.mem;
                m.write_obj(addr, GuestAddress(at)).unwrap();
                m.write_obj(len, GuestAddress(at + 8)).unwrap();
                m.write_obj(flags, GuestAddress(at + 12)).unwrap();
                m.write_obj(idx + 1, GuestAddress(at + 14)).unwrap();
                self.next_desc += 1;
            }
            let slot = AVAIL + 4 + u64::from(self.avail_idx % QSIZE) * 2;
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx += 1;
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            self.mem
                .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
                .unwrap();
            head
        }

        pub fn header(&self, at: u64, rtype: u32, sector: u64) {
            self.mem.write_obj(rtype, GuestAddress(at)).unwrap();
            self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
            self.mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
        }

        /// Kick and wait until the used index reaches `n`.
        pub fn kick_and_wait(&self, n: u16) {
            self.kick.write(1).unwrap();
            let t = Instant::now();
            loop {
                let used: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
                if used >= n {
                    return;
                }
                let st: Vec<u8> = (0..8).map(|i| self.byte(0x5000 + i)).collect();
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "used index stuck at {used}; status bytes {st:?}"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        pub fn byte(&self, at: u64) -> u8 {
            self.mem.read_obj(GuestAddress(at)).unwrap()
        }
    }
}

#[test]
fn raw_frontend_bad_requests_get_an_error_status_and_the_daemon_lives_on() {
    let e = export(&["--name", "raw"]);
    let mut g = raw::Guest::connect(&e.sock);
    let pattern = pattern(7, 512);
    g.mem
        .write_slice(&pattern, vm_memory::GuestAddress(0x4000))
        .unwrap();
    use vm_memory::Bytes;
    // 1. A good write of sector 3.
    g.header(0x3000, 1, 3);
    g.push(&[(0x3000, 16, false), (0x4000, 512, false), (0x5000, 1, true)]);
    // 2. Data outside guest memory.
    g.header(0x3010, 0, 0);
    g.push(&[
        (0x3010, 16, false),
        (0x40_0000_0000, 512, true),
        (0x5001, 1, true),
    ]);
    // 3. Unknown request type.
    g.header(0x3020, 99, 0);
    g.push(&[(0x3020, 16, false), (0x5002, 1, true)]);
    // 4. A header of 8 bytes.
    g.header(0x3030, 0, 0);
    g.push(&[(0x3030, 8, false), (0x5003, 1, true)]);
    // 5. Beyond the end of the device.
    g.header(0x3040, 0, SIZE / 512);
    g.push(&[(0x3040, 16, false), (0x6000, 512, true), (0x5004, 1, true)]);
    // 6. GET_ID.
    g.header(0x3050, 8, 0);
    g.push(&[(0x3050, 16, false), (0x7000, 20, true), (0x5005, 1, true)]);
    for s in 0..7u64 {
        g.mem
            .write_obj(0xffu8, vm_memory::GuestAddress(0x5000 + s))
            .unwrap();
    }
    // Requests in flight together have no order: let the write finish before reading.
    g.kick_and_wait(6);
    // 7. A good read of sector 3 into 0x8000.
    g.header(0x3060, 0, 3);
    g.push(&[(0x3060, 16, false), (0x8000, 512, true), (0x5006, 1, true)]);
    g.kick_and_wait(7);
    let st: Vec<u8> = (0..7).map(|i| g.byte(0x5000 + i)).collect();
    assert_eq!(st, vec![0, 1, 2, 1, 1, 0, 0], "statuses");
    let mut id = [0u8; 20];
    g.mem
        .read_slice(&mut id, vm_memory::GuestAddress(0x7000))
        .unwrap();
    assert_eq!(&id[..4], b"raw\0");
    let mut back = vec![0u8; 512];
    g.mem
        .read_slice(&mut back, vm_memory::GuestAddress(0x8000))
        .unwrap();
    assert!(back == pattern);
    drop(g);

    // A memory table with overlapping regions is refused (REPLY_ACK reports it).
    {
        use vhost::vhost_user::message::VhostUserProtocolFeatures;
        use vhost::vhost_user::{Frontend, VhostUserFrontend};
        use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
        let f = raw::memfd(raw::MEM);
        let a = raw::region(&f, 0, 0x10000);
        let b = raw::region(&f, 0x8000, 0x10000);
        let mut fe = Frontend::connect(&e.sock, 1).unwrap();
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        fe.set_features(features).unwrap();
        fe.get_protocol_features().unwrap();
        fe.set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK)
            .unwrap();
        fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
        let regions = [
            VhostUserMemoryRegionInfo::from_guest_region(&a).unwrap(),
            VhostUserMemoryRegionInfo::from_guest_region(&b).unwrap(),
        ];
        assert!(
            fe.set_mem_table(&regions).is_err(),
            "overlapping memory table accepted"
        );
    }
    // The daemon still serves the next frontend, and the good write landed.
    let mut c = Client::connect(&e.sock, 1, false);
    let p = c.region.addr as *mut u8;
    assert_eq!(
        c.sync_op(0, |q| q.read(3 * 512, p, 512, 0, ReqFlags::empty())),
        0
    );
    assert!(c.buf(0, 512) == &pattern[..]);
}

/// Inflight resubmission, deterministic: the test plays a backend that died with requests
/// in flight by writing the shared inflight area itself (the same layout a SIGKILLed
/// emberd leaves), then reconnects the way QEMU does after a crash.
#[test]
fn raw_frontend_inflight_requests_are_resubmitted_after_reconnect() {
    use raw::{Guest, Inflight, QSIZE, USED};
    use vm_memory::{Bytes, GuestAddress};
    let e = export(&["--name", "inflight"]);
    let mut g = Guest::setup(&e.sock, raw::memfd(raw::MEM), Inflight::Get);
    // Three writes of distinct data to sectors 10, 11, 12, put in the avail ring without
    // a kick (the backend does not look at them).
    let mut heads = Vec::new();
    for i in 0..3u64 {
        let hdr = 0x3000 + i * 16;
        let data = 0x4000 + i * 512;
        g.header(hdr, 1, 10 + i);
        g.mem
            .write_slice(&pattern(20 + i, 512), GuestAddress(data))
            .unwrap();
        g.mem.write_obj(0xffu8, GuestAddress(0x5000 + i)).unwrap();
        heads.push(g.push(&[(hdr, 16, false), (data, 512, false), (0x5000 + i, 1, true)]));
    }
    let (info, area_file) = g.inflight.take().expect("inflight area");
    let mem_file = g.mem_file.try_clone().unwrap();
    let next_desc = g.next_desc;
    drop(g);
    // What a backend killed mid-way leaves: all three popped (counters 7, 8, 9); the
    // first one already in the used ring (used->idx = 1, last_batch_head = it) but the
    // area not yet updated (its used_idx is still 0, its flag still set).
    let area = raw::region(&area_file, 0, info.mmap_size as usize);
    let area = vm_memory::GuestMemoryMmap::from_regions(vec![area]).unwrap();
    area.write_obj(1u16, GuestAddress(8)).unwrap(); // version
    area.write_obj(QSIZE, GuestAddress(10)).unwrap(); // desc_num
    area.write_obj(heads[0], GuestAddress(12)).unwrap(); // last_batch_head
    area.write_obj(0u16, GuestAddress(14)).unwrap(); // used_idx
    for (n, &h) in heads.iter().enumerate() {
        let d = 16 + u64::from(h) * 16;
        area.write_obj(1u8, GuestAddress(d)).unwrap();
        area.write_obj(7 + n as u64, GuestAddress(d + 8)).unwrap();
    }
    let guest = vm_memory::GuestMemoryMmap::from_regions(vec![raw::region(&mem_file, 0, raw::MEM)])
        .unwrap();
    guest
        .write_obj(u32::from(heads[0]), GuestAddress(USED + 4))
        .unwrap();
    guest.write_obj(1u32, GuestAddress(USED + 8)).unwrap();
    guest.write_obj(0u8, GuestAddress(0x5000)).unwrap();
    guest.write_obj(1u16, GuestAddress(USED + 2)).unwrap();

    // Reconnect with the kept area: the backend must resubmit exactly the two others.
    let mut g = Guest::setup(&e.sock, mem_file, Inflight::Set(info, area_file));
    g.next_desc = next_desc;
    g.kick_and_wait(3);
    std::thread::sleep(Duration::from_millis(200));
    let used: u16 = g.mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used, 3, "requests completed twice or lost");
    assert_eq!((g.byte(0x5001), g.byte(0x5002)), (0, 0), "statuses");
    let file = std::fs::read(&e.file).unwrap();
    assert!(file[11 * 512..12 * 512] == pattern(21, 512)[..]);
    assert!(file[12 * 512..13 * 512] == pattern(22, 512)[..]);
    assert!(
        file[10 * 512..11 * 512].iter().all(|&b| b == 0),
        "the used one was redone; emberd log:\n{}",
        e.daemon.log_text()
    );
    // New requests continue after the resubmitted ones.
    g.header(0x3100, 1, 13);
    g.push(&[(0x3100, 16, false), (0x4000, 512, false), (0x5010, 1, true)]);
    g.kick_and_wait(4);
    assert_eq!(g.byte(0x5010), 0);
    assert!(std::fs::read(&e.file).unwrap()[13 * 512..14 * 512] == pattern(20, 512)[..]);
}
