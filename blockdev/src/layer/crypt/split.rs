//! Sharing one large en/decryption with a helper thread.
//!
//! A 1 MiB LUKS read is decrypted on the I/O thread right before its reply is sent; with
//! one thread per connection the cipher pass and the socket copy run one after the other
//! while the second core often waits. A [`Splitter`] lends such a buffer to one helper
//! thread per device: the buffer is cut into [`CHUNK`]-byte pieces, a shared atomic
//! counter hands them out, and the calling thread works on them too. The caller never
//! waits for the helper to wake up: if the helper is busy or asleep the caller simply
//! does every chunk itself; it only waits for a chunk the helper has already claimed
//! (at most [`CHUNK`] bytes of work). Small requests (below [`SPLIT_MIN`]) never leave the
//! calling thread: a wake-up costs more than it saves.
//!
//! Memory safety: the job holds raw pointers to the caller's buffers. A chunk is only
//! touched by whoever claimed it with `fetch_add`, and the caller returns only once
//! every claimed byte is reported done, so no pointer is used after the call returns
//! (a late helper finds the counter past the end and touches nothing).

use ember_crypto::SectorCipher;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// Buffers at least this large are shared with the helper.
pub const SPLIT_MIN: usize = 256 << 10;
/// Unit of work handed out (a multiple of every LUKS sector size).
pub const CHUNK: usize = 64 << 10;

/// One en/decryption on offer.
struct Job {
    /// Source for an out-of-place encryption; null for in place.
    src: *const u8,
    dst: *mut u8,
    len: usize,
    offset: u64,
    encrypt: bool,
    /// Next byte to hand out.
    next: AtomicUsize,
    /// Bytes finished (by either thread).
    done: AtomicUsize,
    failed: AtomicBool,
}

// SAFETY: the pointers are only dereferenced for chunks claimed through `next`, and the
// thread that created the job keeps both buffers alive and untouched until `done` reaches
// `len` (see `Splitter::run`); the rest of the job is atomics and plain values.
unsafe impl Send for Job {}
// SAFETY: as above; every claimed chunk is disjoint, so no two threads touch one byte.
unsafe impl Sync for Job {}

impl Job {
    /// Claim and process chunks until none are left.
    fn work(&self, cipher: &SectorCipher) {
        loop {
            let at = self.next.fetch_add(CHUNK, Ordering::Relaxed);
            if at >= self.len {
                return;
            }
            let n = CHUNK.min(self.len - at);
            let offset = self.offset + at as u64;
            // SAFETY: [at, at + n) lies inside the destination buffer, was claimed by this
            // thread alone (fetch_add above), and the buffer outlives the job's use (the
            // owner waits for `done`).
            let dst = unsafe { std::slice::from_raw_parts_mut(self.dst.add(at), n) };
            let r = if self.src.is_null() {
                if self.encrypt {
                    cipher.encrypt(dst, offset)
                } else {
                    cipher.decrypt(dst, offset)
                }
            } else {
                // SAFETY: the source has the destination's length and the same lifetime
                // guarantee; it is only read.
                let src = unsafe { std::slice::from_raw_parts(self.src.add(at), n) };
                cipher.encrypt_to(src, dst, offset)
            };
            if r.is_err() {
                self.failed.store(true, Ordering::Relaxed);
            }
            self.done.fetch_add(n, Ordering::Release);
        }
    }
}

#[derive(Default)]
struct Slot {
    job: Option<Arc<Job>>,
    stop: bool,
}

struct Shared {
    cipher: Arc<SectorCipher>,
    slot: Mutex<Slot>,
    wake: Condvar,
}

/// A device's cipher with an optional helper thread (started on first large use).
pub struct Splitter {
    shared: Arc<Shared>,
    helper: OnceLock<bool>,
}

impl Splitter {
    /// A splitter for `cipher`.
    pub fn new(cipher: Arc<SectorCipher>) -> Self {
        Splitter {
            shared: Arc::new(Shared {
                cipher,
                slot: Mutex::new(Slot::default()),
                wake: Condvar::new(),
            }),
            helper: OnceLock::new(),
        }
    }

    fn helper_running(&self) -> bool {
        *self.helper.get_or_init(|| {
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name("ember-crypt".into())
                .spawn(move || helper(&shared));
            match spawned {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "no crypt helper thread; en/decrypting inline");
                    false
                }
            }
        })
    }

    /// Decrypt `data` in place (`encrypt` false), encrypt it in place, or encrypt `src`
    /// into it (`src` given, same length). Same contract as the [`SectorCipher`] calls.
    pub fn run(
        &self,
        src: Option<&[u8]>,
        data: &mut [u8],
        offset: u64,
        encrypt: bool,
    ) -> ember_crypto::Result<()> {
        let cipher = &*self.shared.cipher;
        let direct = |data: &mut [u8]| match (src, encrypt) {
            (Some(s), _) => cipher.encrypt_to(s, data, offset),
            (None, true) => cipher.encrypt(data, offset),
            (None, false) => cipher.decrypt(data, offset),
        };
        let ss = cipher.sector_size();
        let shareable = data.len() >= SPLIT_MIN
            && src.is_none_or(|s| s.len() == data.len())
            && data.len().is_multiple_of(ss)
            && offset.is_multiple_of(ss as u64);
        if !shareable || !self.helper_running() {
            return direct(data);
        }
        let job = Arc::new(Job {
            src: src.map_or(std::ptr::null(), <[u8]>::as_ptr),
            dst: data.as_mut_ptr(),
            len: data.len(),
            offset,
            encrypt,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
        });
        let offered = match self.shared.slot.lock() {
            Ok(mut s) if s.job.is_none() && !s.stop => {
                s.job = Some(job.clone());
                true
            }
            // The helper is busy with another thread's job (or the lock is poisoned).
            _ => false,
        };
        if !offered {
            return direct(data);
        }
        self.shared.wake.notify_one();
        job.work(cipher);
        // Withdraw the offer if the helper never picked it up.
        if let Ok(mut s) = self.shared.slot.lock() {
            if s.job.as_ref().is_some_and(|j| Arc::ptr_eq(j, &job)) {
                s.job = None;
            }
        }
        // Wait for the chunks the helper claimed (at most one, in progress).
        let mut spins = 0u32;
        while job.done.load(Ordering::Acquire) < job.len {
            if spins < 1 << 12 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
        if job.failed.load(Ordering::Relaxed) {
            // Cannot happen for the lengths checked above; report it like the cipher would.
            return Err(ember_crypto::Error::Misaligned {
                offset,
                len: job.len as u64,
                sector_size: ss,
            });
        }
        Ok(())
    }
}

impl Drop for Splitter {
    fn drop(&mut self) {
        if let Ok(mut s) = self.shared.slot.lock() {
            s.stop = true;
        }
        self.shared.wake.notify_all();
    }
}

fn helper(shared: &Shared) {
    loop {
        let job = {
            let Ok(mut s) = shared.slot.lock() else {
                return;
            };
            loop {
                if s.stop {
                    return;
                }
                if let Some(j) = s.job.take() {
                    break j;
                }
                s = match shared.wake.wait(s) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            }
        };
        job.work(&shared.cipher);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher() -> Arc<SectorCipher> {
        let key: Vec<u8> = (0..64u8).collect();
        Arc::new(SectorCipher::new(&key, 512).unwrap())
    }

    #[test]
    fn split_matches_the_plain_cipher() {
        let c = cipher();
        let s = Splitter::new(c.clone());
        for len in [4096, SPLIT_MIN, SPLIT_MIN + 512, 1 << 20, (3 << 20) + 4096] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
            let off = 512 * 77;
            let mut want = plain.clone();
            c.encrypt(&mut want, off).unwrap();
            // Out of place.
            let mut got = vec![0u8; len];
            s.run(Some(&plain), &mut got, off, true).unwrap();
            assert_eq!(got, want, "encrypt_to {len}");
            // In place, both ways.
            let mut buf = plain.clone();
            s.run(None, &mut buf, off, true).unwrap();
            assert_eq!(buf, want, "encrypt {len}");
            s.run(None, &mut buf, off, false).unwrap();
            assert_eq!(buf, plain, "decrypt {len}");
        }
    }

    #[test]
    fn many_threads_share_one_helper() {
        let c = cipher();
        let s = Arc::new(Splitter::new(c.clone()));
        let plain: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let mut want = plain.clone();
        c.encrypt(&mut want, 0).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (s, plain, want) = (s.clone(), plain.clone(), want.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let mut b = plain.clone();
                        s.run(None, &mut b, 0, true).unwrap();
                        assert_eq!(b, want);
                        s.run(None, &mut b, 0, false).unwrap();
                        assert_eq!(b, plain);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn misaligned_is_refused_like_the_cipher() {
        let s = Splitter::new(cipher());
        let mut b = vec![0u8; SPLIT_MIN + 100];
        assert!(s.run(None, &mut b, 0, false).is_err());
        let mut b = vec![0u8; SPLIT_MIN];
        assert!(s.run(None, &mut b, 3, false).is_err());
    }
}
