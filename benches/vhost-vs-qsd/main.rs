//! vhost-user-blk: Ember vs qemu-storage-daemon, same tmpfs file, same client (blkio).
//!
//! Run: `cargo bench -p emberd --bench vhost-vs-qsd` (env: `BENCH_SECS` per case, default
//! 5; `BENCH_SIZE_MIB`, default 1024; `BENCH_MODES`, default `plain,luks`). For each mode,
//! server, queue count (1, 2) and workload (4k randread/randwrite QD32, 1M read/write QD8)
//! one blkio connection drives every queue from its own thread, keeping QD requests in
//! flight per queue. Prints IOPS, MiB/s, p50/p99 latency and Ember's ratio. Numbers go in
//! benches/README.md.
//!
//! `luks` serves a LUKS1 aes-xts-plain64 image made by `qemu-img create -f luks` (fully
//! preallocated): Ember with `--passphrase-file`, qemu-storage-daemon with its `luks`
//! driver over the same file.

use blkio::{Blkio, Blkioq, ReqFlags};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
struct Workload {
    name: &'static str,
    bs: usize,
    qd: usize,
    write: bool,
    random: bool,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "4k randread QD32",
        bs: 4096,
        qd: 32,
        write: false,
        random: true,
    },
    Workload {
        name: "4k randwrite QD32",
        bs: 4096,
        qd: 32,
        write: true,
        random: true,
    },
    Workload {
        name: "1M read QD8",
        bs: 1 << 20,
        qd: 8,
        write: false,
        random: false,
    },
    Workload {
        name: "1M write QD8",
        bs: 1 << 20,
        qd: 8,
        write: true,
        random: false,
    },
];

#[derive(Debug, Default, Clone, Copy)]
struct Result {
    iops: f64,
    mibs: f64,
    p50_us: f64,
    p99_us: f64,
}

struct Server {
    child: Child,
    sock: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How the file is served: as is, or as LUKS with the passphrase in this file.
#[derive(Clone, Copy)]
enum Mode<'a> {
    Plain,
    Luks { pass_file: &'a Path },
}

fn start_ember(file: &Path, sock: &Path, queues: u16, mode: Mode) -> Server {
    let _ = std::fs::remove_file(sock);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_emberd"));
    cmd.args(["export", "--file"]).arg(file);
    if let Mode::Luks { pass_file } = mode {
        cmd.arg("--passphrase-file").arg(pass_file);
    }
    let child = cmd
        .arg("--vhost-user")
        .arg(sock)
        .args(["--num-queues", &queues.to_string(), "--threads", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn emberd");
    wait_for(sock);
    Server {
        child,
        sock: sock.to_path_buf(),
    }
}

fn start_qsd(file: &Path, sock: &Path, queues: u16, mode: Mode) -> Server {
    let _ = std::fs::remove_file(sock);
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev").arg(format!(
        "driver=file,node-name=f,filename={},aio=io_uring,cache.direct=off",
        file.display()
    ));
    let node = match mode {
        Mode::Plain => "f",
        Mode::Luks { pass_file } => {
            cmd.arg("--object")
                .arg(format!("secret,id=sec0,file={}", pass_file.display()))
                .arg("--blockdev")
                .arg("driver=luks,node-name=c,file=f,key-secret=sec0");
            "c"
        }
    };
    let child = cmd
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name={node},addr.type=unix,addr.path={},writable=on,num-queues={queues}",
            sock.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon is not installed");
    wait_for(sock);
    Server {
        child,
        sock: sock.to_path_buf(),
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

/// Drive one queue for `secs`; returns (ops, latencies in ns).
fn drive(
    q: &mut Blkioq,
    buf: usize,
    w: Workload,
    size: u64,
    secs: f64,
    seed: u64,
) -> (u64, Vec<u32>) {
    let mut x = seed | 1;
    let mut next_off = |seq: &mut u64| -> u64 {
        if w.random {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (size / w.bs as u64)) * w.bs as u64
        } else {
            let o = *seq;
            *seq = (*seq + w.bs as u64) % size;
            o
        }
    };
    let mut seq = (seed % 16) * (size / 16) / w.bs as u64 * w.bs as u64;
    let mut started = vec![Instant::now(); w.qd];
    let submit = |q: &mut Blkioq, slot: usize, off: u64| {
        let p = (buf + slot * w.bs) as *mut u8;
        if w.write {
            q.write(off, p, w.bs, slot, ReqFlags::empty());
        } else {
            q.read(off, p, w.bs, slot, ReqFlags::empty());
        }
    };
    for (slot, s) in started.iter_mut().enumerate() {
        *s = Instant::now();
        submit(q, slot, next_off(&mut seq));
    }
    let mut comps: Vec<MaybeUninit<blkio::Completion>> =
        (0..w.qd).map(|_| MaybeUninit::uninit()).collect();
    let mut lat = Vec::with_capacity(1 << 20);
    let t0 = Instant::now();
    let end = Duration::from_secs_f64(secs);
    let mut ops = 0u64;
    let mut outstanding = w.qd;
    while outstanding > 0 {
        let n = q.do_io(&mut comps, 1, None, None).expect("do_io");
        let now = Instant::now();
        let stop = now - t0 >= end;
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first n entries.
            let c = unsafe { c.assume_init_ref() };
            assert_eq!(c.ret, 0, "I/O error during the bench");
            let slot = c.user_data;
            lat.push((now - started[slot]).as_nanos().min(u128::from(u32::MAX)) as u32);
            ops += 1;
            if stop {
                outstanding -= 1;
            } else {
                started[slot] = Instant::now();
                submit(q, slot, next_off(&mut seq));
            }
        }
    }
    (ops, lat)
}

fn run_case(sock: &Path, queues: u16, w: Workload, size: u64, secs: f64) -> Result {
    let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio");
    b.set_str("path", sock.to_str().unwrap()).unwrap();
    b.connect().expect("connect");
    b.set_i32("num-queues", i32::from(queues)).unwrap();
    let mut out = b.start().expect("start");
    let per_thread = w.qd * w.bs;
    let region = b
        .alloc_mem_region(per_thread * usize::from(queues))
        .expect("mem region");
    b.map_mem_region(&region).expect("map region");
    let t = Instant::now();
    let results: Vec<(u64, Vec<u32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = out
            .queues
            .iter_mut()
            .enumerate()
            .map(|(i, q)| {
                let buf = region.addr + i * per_thread;
                s.spawn(move || drive(q, buf, w, size, secs, 0x1234_5678 + i as u64 * 7919))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = t.elapsed().as_secs_f64();
    drop(out);
    b.unmap_mem_region(&region);
    b.free_mem_region(&region);
    let ops: u64 = results.iter().map(|r| r.0).sum();
    let mut lat: Vec<u32> = results.into_iter().flat_map(|r| r.1).collect();
    lat.sort_unstable();
    Result {
        iops: ops as f64 / elapsed,
        mibs: ops as f64 * w.bs as f64 / elapsed / f64::from(1 << 20),
        p50_us: percentile(&lat, 0.50),
        p99_us: percentile(&lat, 0.99),
    }
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let size_mib: u64 = std::env::var("BENCH_SIZE_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let dir = tempfile::Builder::new()
        .prefix("ember-bench")
        .tempdir_in("/dev/shm")
        .expect("tmpfs");
    let file = dir.path().join("disk.img");
    // A fully written file (no holes: reads must copy real pages).
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&file).unwrap();
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..size_mib {
            f.write_all(&chunk).unwrap();
        }
    }
    let size = size_mib << 20;
    let modes = std::env::var("BENCH_MODES").unwrap_or_else(|_| "plain,luks".into());
    let pass_file = dir.path().join("pass");
    std::fs::write(&pass_file, "bench-passphrase").unwrap();
    let luks_file = dir.path().join("luks.img");
    let sock = dir.path().join("vhost.sock");
    for mode_name in modes.split(',').filter(|m| !m.is_empty()) {
        let (mode, file, size) = match mode_name {
            "plain" => (Mode::Plain, file.clone(), size),
            "luks" => {
                if !luks_file.exists() {
                    let st = Command::new("qemu-img")
                        .args(["create", "-q", "-f", "luks", "--object"])
                        .arg(format!("secret,id=sec0,file={}", pass_file.display()))
                        .args(["-o", "key-secret=sec0,preallocation=full"])
                        .arg(&luks_file)
                        .arg(format!("{size_mib}M"))
                        .status()
                        .expect("qemu-img is not installed");
                    assert!(st.success(), "qemu-img create -f luks failed");
                }
                (
                    Mode::Luks {
                        pass_file: &pass_file,
                    },
                    luks_file.clone(),
                    size,
                )
            }
            other => panic!("BENCH_MODES: unknown mode {other:?} (plain, luks)"),
        };
        run_mode(mode_name, mode, &file, &sock, size, size_mib, secs);
    }
}

fn run_mode(name: &str, mode: Mode, file: &Path, sock: &Path, size: u64, size_mib: u64, secs: f64) {
    println!(
        "vhost-user-blk {name}, blkio client, tmpfs file of {size_mib} MiB, {secs} s per case"
    );
    println!(
        "{:<20} {:>2} | {:>10} {:>9} {:>8} {:>8} | {:>10} {:>9} {:>8} {:>8} | {:>6} {:>6}",
        "workload",
        "q",
        "qsd IOPS",
        "MiB/s",
        "p50 us",
        "p99 us",
        "ember IOPS",
        "MiB/s",
        "p50 us",
        "p99 us",
        "ratio",
        "p99x"
    );
    for queues in [1u16, 2] {
        for w in WORKLOADS {
            let qsd = {
                let _s = start_qsd(file, sock, queues, mode);
                run_case(sock, queues, w, size, secs)
            };
            let ember = {
                let _s = start_ember(file, sock, queues, mode);
                run_case(sock, queues, w, size, secs)
            };
            println!(
                "{:<20} {:>2} | {:>10.0} {:>9.1} {:>8.1} {:>8.1} | {:>10.0} {:>9.1} {:>8.1} {:>8.1} | {:>5.2}x {:>5.2}x",
                w.name,
                queues,
                qsd.iops,
                qsd.mibs,
                qsd.p50_us,
                qsd.p99_us,
                ember.iops,
                ember.mibs,
                ember.p50_us,
                ember.p99_us,
                ember.iops / qsd.iops.max(1.0),
                ember.p99_us / qsd.p99_us.max(0.001),
            );
        }
    }
}
