//! XTS sector cipher throughput per core: 512- and 4096-byte sectors, 256- and 512-bit
//! keys, encrypt and decrypt, on 1 MiB per call (a large I/O).
//!
//! Two groups: `xts` measures wall-clock time (criterion's default) and `xts-cpu` the
//! calling thread's CPU time, which is what `openssl speed` reports by default and stays
//! meaningful on a loaded machine. `benches/xts-vs-openssl.sh` prints both next to OpenSSL.

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ember_crypto::SectorCipher;
use std::hint::black_box;
use std::time::Duration;

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    assert_eq!(r, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Criterion measurement of thread CPU time.
struct CpuTime;

static WALL: WallTime = WallTime;

impl Measurement for CpuTime {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu()
    }

    fn end(&self, start: Duration) -> Duration {
        thread_cpu().saturating_sub(start)
    }

    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }

    fn zero(&self) -> Duration {
        Duration::ZERO
    }

    fn to_f64(&self, v: &Duration) -> f64 {
        v.as_nanos() as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        WALL.formatter()
    }
}

fn xts<M: Measurement>(c: &mut Criterion<M>, group: &str) {
    let mut g = c.benchmark_group(group);
    let len = 1 << 20;
    g.throughput(Throughput::Bytes(len as u64));
    let mut buf = vec![0x5au8; len];
    for key_bits in [512usize, 256] {
        let key: Vec<u8> = (0..key_bits / 8).map(|i| i as u8).collect();
        for ss in [512usize, 4096] {
            let cipher = SectorCipher::new(&key, ss).expect("valid key");
            let id = format!("aes{}-xts/{ss}", key_bits / 2);
            g.bench_with_input(BenchmarkId::new("encrypt", &id), &ss, |b, _| {
                b.iter(|| {
                    cipher
                        .encrypt(black_box(&mut buf), 1 << 20)
                        .expect("aligned")
                })
            });
            g.bench_with_input(BenchmarkId::new("decrypt", &id), &ss, |b, _| {
                b.iter(|| {
                    cipher
                        .decrypt(black_box(&mut buf), 1 << 20)
                        .expect("aligned")
                })
            });
        }
    }
    g.finish();
}

fn wall(c: &mut Criterion) {
    xts(c, "xts");
}

fn cpu(c: &mut Criterion<CpuTime>) {
    xts(c, "xts-cpu");
}

criterion_group!(wall_clock, wall);
criterion_group! {
    name = cpu_time;
    config = Criterion::default().with_measurement(CpuTime);
    targets = cpu
}
criterion_main!(wall_clock, cpu_time);
