//! A split virtqueue as a hostile guest writes it: the avail ring, the descriptor table,
//! indirect tables and the request bytes all come from the input; so do the queue size,
//! the negotiated features (EVENT_IDX, INDIRECT_DESC), the indexes the device starts
//! from (with chains already outstanding) and an inflight region left by a previous
//! backend. The target runs the worker's passes with the same building blocks
//! (`ring::pending`, `ring::pop_head`, `ring::walk_chain`, `request::decode`, the used
//! ring and the EVENT_IDX notification logic of `virtio-queue`) and checks the
//! invariants the worker relies on:
//! - a pass pops at most queue-size chains, and never more than queue-size are
//!   outstanding; a chain is at most queue-size descriptors;
//! - every iovec a decoded request hands to the device lies inside guest memory;
//! - an impossible ring state ends the pass with an error, never a panic or a hang;
//! - inflight recovery resubmits distinct heads below the queue size.
//!
//! Input layout: `[size_log2, flags, base_lo, base_hi, outstanding, used_event_lo,
//! used_event_hi, inflight_used]`, then the first 64 KiB of guest memory (descriptor
//! table at 0, avail ring at 0x4000, used ring at 0x5000); guest memory also has a 16 MiB
//! zero region at 1 MiB for data. Flags: 1 EVENT_IDX, 2 INDIRECT_DESC, 4 read-only
//! export, 8 start from an inflight region (its bytes: the 4 KiB after the memory image).
#![no_main]

use ember_blockdev::DeviceInfo;
use ember_daemon::vhost::inflight::{queue_region_size, InflightArea};
use ember_daemon::vhost::request::{self, Ctx, Decoded, Mem, Seg};
use ember_daemon::vhost::ring;
use libfuzzer_sys::fuzz_target;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

const IMAGE: usize = 64 << 10;
const DATA_AT: u64 = 1 << 20;
const DATA_LEN: usize = 16 << 20;
const INFLIGHT_BYTES: usize = 4096;

fn ctx(read_only: bool) -> Ctx {
    Ctx {
        info: DeviceInfo::new(64 << 20, 32 << 20),
        read_only,
        writethrough: false,
        id: *b"ember-fuzz-volume-00",
    }
}

/// Every byte of `[base, base+len)` lies in one of `mem`'s host mappings.
fn inside(mem: &Mem, base: *const u8, len: usize) -> bool {
    mem.iter().any(|r| {
        let start = r.get_host_address(vm_memory::MemoryRegionAddress(0)).unwrap() as usize;
        let end = start + r.len() as usize;
        let b = base as usize;
        b >= start && b.checked_add(len).is_some_and(|e| e <= end)
    })
}

/// Recovery from an inflight region holding `bytes`: (heads to resubmit, next avail).
fn inflight_recovery(bytes: &[u8], size: u16, used: u16) -> Option<(Vec<u16>, u16)> {
    {
        // SAFETY: memfd_create with a valid name; the fd is checked.
        let fd = unsafe { libc::memfd_create(c"fuzz-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a fresh fd we own.
        let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
        let need = queue_region_size(size);
        f.set_len(need as u64).ok()?;
        f.write_all(&bytes[..bytes.len().min(need)]).ok()?;
        let area = Arc::new(InflightArea::map(f, 0, need, 1, size).ok()?);
        let r = area.queue(0)?.recover(size, used);
        Some((r.resubmit, r.next_avail))
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let size = 1u16 << (data[0] % 11);
    let flags = data[1];
    let (event_idx, indirect, read_only, use_inflight) =
        (flags & 1 != 0, flags & 2 != 0, flags & 4 != 0, flags & 8 != 0);
    let base = u16::from_le_bytes([data[2], data[3]]);
    let outstanding = u16::from(data[4]) % (size + 1);
    let inflight_used = data[7];
    let rest = &data[8..];
    let image = &rest[..rest.len().min(IMAGE)];
    let inflight_bytes = rest.get(IMAGE..).unwrap_or(&[]);
    let inflight_bytes = &inflight_bytes[..inflight_bytes.len().min(INFLIGHT_BYTES)];

    let mem: Mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), IMAGE),
        (GuestAddress(DATA_AT), DATA_LEN),
    ])
    .unwrap();
    mem.write_slice(image, GuestAddress(0)).unwrap();

    let mut q = Queue::new(1024).unwrap();
    q.set_size(size);
    q.try_set_desc_table_address(GuestAddress(0)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(0x4000)).unwrap();
    q.try_set_used_ring_address(GuestAddress(0x5000)).unwrap();
    q.set_event_idx(event_idx);
    q.set_ready(true);
    assert!(q.is_valid(&mem));
    // Chains popped by an earlier pass and not yet used.
    q.set_next_used(base.wrapping_sub(outstanding));
    q.set_next_avail(base);

    if use_inflight && !inflight_bytes.is_empty() {
        let used = u16::from(inflight_used);
        if let Some((resubmit, next_avail)) = inflight_recovery(inflight_bytes, size, used) {
            assert!(resubmit.len() <= usize::from(size));
            let mut seen = std::collections::HashSet::new();
            for &h in &resubmit {
                assert!(h < size, "resubmit head {h} of a {size}-entry queue");
                assert!(seen.insert(h), "head {h} resubmitted twice");
            }
            assert_eq!(next_avail, used.wrapping_add(resubmit.len() as u16));
        }
    }

    let c = ctx(read_only);
    let mut segs: Vec<Seg> = Vec::new();
    let mut in_flight = usize::from(outstanding);
    // Three passes, as three kicks: each pops at most `size` chains.
    'passes: for pass in 0..3u16 {
        let mut popped = 0usize;
        loop {
            if event_idx {
                let _ = q.disable_notification(&mem);
            }
            let n = match ring::pending(&q, &mem) {
                Ok(n) => n,
                Err(_) => break 'passes,
            };
            assert!(usize::from(n) + in_flight <= usize::from(size));
            if n == 0 {
                if !event_idx {
                    break;
                }
                match q.enable_notification(&mem) {
                    Ok(true) if popped < usize::from(size) => continue,
                    _ => break,
                }
            }
            for _ in 0..n {
                if popped == usize::from(size) {
                    break;
                }
                popped += 1;
                let head = match ring::pop_head(&mut q, &mem) {
                    Ok(h) => h,
                    Err(_) => break 'passes,
                };
                assert!(head < size);
                in_flight += 1;
                if ring::walk_chain(&mem, q.desc_table(), size, head, indirect, &mut segs).is_err() {
                    break 'passes;
                }
                assert!(!segs.is_empty() && segs.len() <= usize::from(size));
                let (status, code, used_len) = match request::decode(&segs, &mem, &c) {
                    Ok(Decoded::Io {
                        iovs,
                        status,
                        len,
                        used_len,
                        ..
                    }) => {
                        let total: usize = iovs.iter().map(|v| v.iov_len).sum();
                        assert_eq!(total as u64, len);
                        for v in &iovs {
                            assert!(inside(&mem, v.iov_base.cast(), v.iov_len));
                        }
                        (Some(status), request::S_OK, used_len)
                    }
                    Ok(Decoded::Done {
                        status,
                        code,
                        used_len,
                    }) => (Some(status), code, used_len),
                    Err(bad) => (bad.status, bad.code, 1),
                };
                // Complete it at once, as a synchronous device would.
                if let Some(s) = status {
                    mem.write_obj(code, s).unwrap();
                }
                if q.add_used(&mem, head, used_len).is_err() {
                    break 'passes;
                }
                in_flight -= 1;
            }
            if popped == usize::from(size) {
                // The pass's budget is spent; the rest waits for the next kick.
                break;
            }
        }
        let _ = q.needs_notification(&mem);
        // Between kicks the guest "answers": the used event follows the used index.
        let ue = u16::from_le_bytes([data[5], data[6]]).wrapping_add(pass);
        let _ = mem.write_obj(
            ue,
            GuestAddress(0x4000 + 4 + 2 * u64::from(size)),
        );
    }
});
