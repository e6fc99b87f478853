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
    let g = guest::Guest::get();
    let e = export(&["--num-queues", "2", "--name", "vol-guest"]);
    let dir = e.file.parent().unwrap().to_path_buf();
    let initrd = g.initrd(&dir, GUEST_IO);
    let mut args = guest::base_args(&g, &initrd, 512);
    args.extend(guest::vhost_blk_args("c0", &e.sock, 2, false));
    let mut q = guest::Qemu::spawn(&dir, &args);
    let (rc, console) = q.wait_exit(Duration::from_secs(600));
    assert_eq!(
        rc,
        0,
        "guest script failed; console:\n{console}\nemberd log:\n{}",
        e.daemon.log_text()
    );
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
    let g = guest::Guest::get();
    let mut e = export(&["--num-queues", "2", "--name", "vol-restart"]);
    let dir = e.file.parent().unwrap().to_path_buf();
    let initrd = g.initrd(&dir, GUEST_LOOP);
    let mut args = guest::base_args(&g, &initrd, 512);
    args.extend(guest::vhost_blk_args("c0", &e.sock, 2, true));
    let mut q = guest::Qemu::spawn(&dir, &args);
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
    let (rc, console) = q.wait_exit(Duration::from_secs(900));
    assert_eq!(
        rc,
        0,
        "guest loop failed across restarts; console:\n{console}\nemberd log:\n{}",
        e.daemon.log_text()
    );
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
    let g = guest::Guest::get();
    let dir = tempfile::tempdir().unwrap();
    let nbd_sock = dir.path().join("nbd.sock");
    let nbd_arg = format!("unix:{}", nbd_sock.display());
    let e = export(&["--nbd", &nbd_arg, "--name", "vol-x"]);
    wait_for_path(&nbd_sock, Duration::from_secs(30));
    let url = format!("nbd+unix:///vol-x?socket={}", nbd_sock.display());
    // Host → guest: write over NBD before the guest boots.
    run_ok(Command::new("qemu-io").args(["-f", "raw", &url, "-c", "write -P 0xcd 4M 1M"]));
    let vdir = e.file.parent().unwrap().to_path_buf();
    let initrd = g.initrd(&vdir, GUEST_CROSS);
    let mut args = guest::base_args(&g, &initrd, 512);
    args.extend(guest::vhost_blk_args("c0", &e.sock, 1, false));
    let mut q = guest::Qemu::spawn(&vdir, &args);
    let (rc, console) = q.wait_exit(Duration::from_secs(600));
    assert_eq!(
        rc,
        0,
        "guest failed; console:\n{console}\nemberd log:\n{}",
        e.daemon.log_text()
    );
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
