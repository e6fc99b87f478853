//! XTS sector cipher throughput (GB/s per core), 512- and 4096-byte sectors, 256- and
//! 512-bit keys, encrypt and decrypt, on a 1 MiB buffer (a typical large I/O).
//! `benches/xts-vs-openssl.sh` prints these next to `openssl speed -evp aes-256-xts`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ember_crypto::SectorCipher;
use std::hint::black_box;

fn xts(c: &mut Criterion) {
    let mut g = c.benchmark_group("xts");
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

criterion_group!(benches, xts);
criterion_main!(benches);
