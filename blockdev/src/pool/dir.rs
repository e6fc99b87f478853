//! [`DirPool`]: a directory of sparse files, one `<id>.img` per object.
//!
//! - Create: `<id>.img.part` is created exclusively, sized with `ftruncate` (sparse, reads
//!   as zeros), synced, then published with `link(part, img)` (which, unlike `rename`,
//!   never replaces an existing object) and the part unlinked; the directory is synced.
//!   A crash leaves either the complete `<id>.img` or a `<id>.img.part` that
//!   [`Pool::list`] reports as partial.
//! - Clone: `ioctl(FICLONE)` (btrfs, XFS, bcachefs share the blocks copy-on-write; O(1)),
//!   else [`copy_device`] through io_uring, skipping holes and zero chunks so sparse
//!   volumes stay sparse.
//! - Free space: `statvfs` of the directory (blocks available to unprivileged users).
//!   A create is refused before any allocation when its full size does not fit, so a
//!   volume can always be written to the end (no silent overcommit).

use super::{
    copy_device, validate_id, validate_size, CloneMethod, CopyOptions, Pool, PoolError, PoolObject,
    PoolStats, Result,
};
use crate::backend::{open, BackendSpec, OpenOptions};
use std::fs::File;
use std::io::ErrorKind as IoKind;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Suffix of a complete object.
const IMG_SUFFIX: &str = ".img";
/// Suffix of an object being built.
const PART_SUFFIX: &str = ".img.part";
/// `_IOW(0x94, 9, int)`: share all blocks of the source fd (linux/fs.h).
const FICLONE: libc::c_ulong = 0x4004_9409;

/// Whether [`DirPool`] may use reflinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reflink {
    /// Reflink when the file system supports it, else copy.
    #[default]
    Auto,
    /// Always copy (tests, or file systems where reflinks are undesirable).
    Never,
}

/// A pool of sparse files in one directory.
#[derive(Debug)]
pub struct DirPool {
    name: String,
    dir: PathBuf,
    reflink: Reflink,
    copy: CopyOptions,
}

fn is_not_found(e: &std::io::Error) -> bool {
    e.kind() == IoKind::NotFound
}

impl DirPool {
    /// A pool named `name` storing its files in `dir` (created if missing).
    pub fn open(name: impl Into<String>, dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| PoolError::io(format!("create pool directory {}", dir.display()), e))?;
        Ok(DirPool {
            name: name.into(),
            dir,
            reflink: Reflink::Auto,
            copy: CopyOptions::default(),
        })
    }

    /// Choose the reflink policy.
    pub fn with_reflink(mut self, reflink: Reflink) -> Self {
        self.reflink = reflink;
        self
    }

    /// The pool's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a complete object.
    pub fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}{IMG_SUFFIX}"))
    }

    fn part_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}{PART_SUFFIX}"))
    }

    fn sync_dir(&self) -> Result<()> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| PoolError::io(format!("sync {}", self.dir.display()), e))
    }

    fn exists(&self, id: &str) -> Result<bool> {
        match std::fs::symlink_metadata(self.path(id)) {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(PoolError::io(format!("stat {id}"), e)),
        }
    }

    /// Create `<id>.img.part` exclusively.
    fn start(&self, id: &str) -> Result<File> {
        if self.exists(id)? {
            return Err(PoolError::AlreadyExists(id.to_string()));
        }
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(self.part_path(id))
            .map_err(|e| match e.kind() {
                // Another create of the same id is running, or a crashed one left its
                // part behind (reconciliation deletes those).
                IoKind::AlreadyExists => PoolError::AlreadyExists(id.to_string()),
                _ => PoolError::io(format!("create {}", self.part_path(id).display()), e),
            })
    }

    /// Sync the part and publish it under the real name.
    fn publish(&self, id: &str, part: File) -> Result<BackendSpec> {
        part.sync_all()
            .map_err(|e| PoolError::io(format!("sync {id}"), e))?;
        drop(part);
        let (p, f) = (self.part_path(id), self.path(id));
        std::fs::hard_link(&p, &f).map_err(|e| match e.kind() {
            IoKind::AlreadyExists => PoolError::AlreadyExists(id.to_string()),
            _ => PoolError::io(format!("publish {}", f.display()), e),
        })?;
        std::fs::remove_file(&p)
            .map_err(|e| PoolError::io(format!("remove {}", p.display()), e))?;
        self.sync_dir()?;
        Ok(BackendSpec::File { path: f })
    }

    /// Run `build` on a fresh part; publish it on success, remove it on failure.
    fn build(&self, id: &str, build: impl FnOnce(&File) -> Result<()>) -> Result<BackendSpec> {
        let part = self.start(id)?;
        match build(&part).and_then(|()| self.publish(id, part)) {
            Ok(spec) => Ok(spec),
            Err(e) => {
                let _ = std::fs::remove_file(self.part_path(id));
                Err(e)
            }
        }
    }

    fn object(&self, id: &str, path: &Path, partial: bool) -> Result<PoolObject> {
        let m = std::fs::metadata(path).map_err(|e| {
            if is_not_found(&e) {
                PoolError::NotFound(id.to_string())
            } else {
                PoolError::io(format!("stat {}", path.display()), e)
            }
        })?;
        Ok(PoolObject {
            id: id.to_string(),
            size: m.len(),
            allocated: m.blocks().saturating_mul(512),
            partial,
        })
    }

    fn statvfs(&self) -> Result<libc::statvfs> {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(self.dir.as_os_str().as_bytes()).map_err(|_| {
            PoolError::Io(
                format!("statvfs {}", self.dir.display()),
                std::io::Error::from(IoKind::InvalidInput),
            )
        })?;
        // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a NUL-terminated path that lives across the call; `st` is a valid,
        // exclusively borrowed out-pointer.
        let rc = unsafe { libc::statvfs(c.as_ptr(), &raw mut st) };
        if rc != 0 {
            return Err(PoolError::io(
                format!("statvfs {}", self.dir.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(st)
    }

    fn check_space(&self, need: u64) -> Result<()> {
        let free = self.free_bytes()?;
        if need > free {
            return Err(PoolError::NoSpace { need, free });
        }
        Ok(())
    }
}

/// Blocks × fragment size; the field types differ between targets (u32 on 32-bit).
#[allow(clippy::useless_conversion)]
fn fs_bytes(blocks: libc::fsblkcnt_t, frsize: libc::c_ulong) -> u64 {
    u64::from(blocks).saturating_mul(u64::from(frsize))
}

/// Share all blocks of `src` into `dst`. `Ok(false)` when the file system cannot.
fn reflink(dst: &File, src: &File) -> std::io::Result<bool> {
    // SAFETY: FICLONE takes the source fd as its integer argument; both fds are open for
    // the duration of the call, and the ioctl touches no user memory.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        // Not supported here, across file systems, or for these files.
        Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EXDEV | libc::EINVAL | libc::EPERM) => {
            Ok(false)
        }
        _ => Err(e),
    }
}

impl Pool for DirPool {
    fn name(&self) -> &str {
        &self.name
    }

    fn create(&self, id: &str, size: u64) -> Result<BackendSpec> {
        validate_id(id)?;
        validate_size(size)?;
        if self.exists(id)? {
            return Err(PoolError::AlreadyExists(id.to_string()));
        }
        self.check_space(size)?;
        self.build(id, |f| {
            f.set_len(size)
                .map_err(|e| PoolError::io(format!("size {id}"), e))
        })
    }

    fn delete(&self, id: &str) -> Result<()> {
        validate_id(id)?;
        for p in [self.path(id), self.part_path(id)] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(PoolError::io(format!("remove {}", p.display()), e)),
            }
        }
        self.sync_dir()
    }

    fn clone_from(&self, src: &str, dst: &str) -> Result<(BackendSpec, CloneMethod)> {
        validate_id(src)?;
        validate_id(dst)?;
        let src_path = self.path(src);
        let so = self.object(src, &src_path, false)?;
        let src_file = File::open(&src_path)
            .map_err(|e| PoolError::io(format!("open {}", src_path.display()), e))?;
        let mut method = CloneMethod::Reflink;
        let spec = self.build(dst, |part| {
            if self.reflink == Reflink::Auto
                && reflink(part, &src_file)
                    .map_err(|e| PoolError::io(format!("reflink {src}"), e))?
            {
                return Ok(());
            }
            // A real copy needs room for the source's allocated blocks.
            self.check_space(so.allocated)?;
            part.set_len(so.size)
                .map_err(|e| PoolError::io(format!("size {dst}"), e))?;
            let ro = OpenOptions {
                read_only: true,
                ..Default::default()
            };
            let copy_err = |e| PoolError::Copy(format!("{src} to {dst}"), e);
            let s = open(
                &BackendSpec::File {
                    path: src_path.clone(),
                },
                &ro,
            )
            .map_err(copy_err)?;
            let d = open(
                &BackendSpec::File {
                    path: self.part_path(dst),
                },
                &OpenOptions::default(),
            )
            .map_err(copy_err)?;
            let opts = CopyOptions {
                dst_zeroed: true,
                ..self.copy
            };
            let stats = copy_device(&s, &d, so.size, &opts).map_err(copy_err)?;
            method = CloneMethod::Copy(stats);
            Ok(())
        })?;
        Ok((spec, method))
    }

    fn resize(&self, id: &str, new_size: u64) -> Result<()> {
        validate_id(id)?;
        let o = self.stat(id)?;
        if new_size < o.size {
            return Err(PoolError::Shrink {
                id: id.to_string(),
                size: o.size,
                new_size,
            });
        }
        if new_size == o.size {
            return Ok(());
        }
        validate_size(new_size)?;
        self.check_space(new_size - o.size)?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path(id))
            .map_err(|e| PoolError::io(format!("open {id}"), e))?;
        f.set_len(new_size)
            .and_then(|()| f.sync_all())
            .map_err(|e| PoolError::io(format!("resize {id}"), e))
    }

    fn free_bytes(&self) -> Result<u64> {
        let st = self.statvfs()?;
        Ok(fs_bytes(st.f_bavail, st.f_frsize))
    }

    fn stats(&self) -> Result<PoolStats> {
        let st = self.statvfs()?;
        let provisioned = self
            .list()?
            .iter()
            .filter(|o| !o.partial)
            .map(|o| o.size)
            .sum();
        Ok(PoolStats {
            total_bytes: fs_bytes(st.f_blocks, st.f_frsize),
            free_bytes: fs_bytes(st.f_bavail, st.f_frsize),
            provisioned_bytes: provisioned,
        })
    }

    fn list(&self) -> Result<Vec<PoolObject>> {
        let rd = std::fs::read_dir(&self.dir)
            .map_err(|e| PoolError::io(format!("list {}", self.dir.display()), e))?;
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| PoolError::io(format!("list {}", self.dir.display()), e))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            let (id, partial) = if let Some(id) = name.strip_suffix(PART_SUFFIX) {
                (id, true)
            } else if let Some(id) = name.strip_suffix(IMG_SUFFIX) {
                (id, false)
            } else {
                continue;
            };
            if validate_id(id).is_err() {
                continue;
            }
            match self.object(id, &ent.path(), partial) {
                Ok(o) => out.push(o),
                // Deleted while we listed.
                Err(PoolError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id).then(a.partial.cmp(&b.partial)));
        Ok(out)
    }

    fn spec(&self, id: &str) -> Result<BackendSpec> {
        validate_id(id)?;
        if !self.exists(id)? {
            return Err(PoolError::NotFound(id.to_string()));
        }
        Ok(BackendSpec::File {
            path: self.path(id),
        })
    }

    fn stat(&self, id: &str) -> Result<PoolObject> {
        validate_id(id)?;
        self.object(id, &self.path(id), false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    const MIB: u64 = 1 << 20;

    fn pool(t: &tempfile::TempDir) -> DirPool {
        DirPool::open("test", t.path().join("pool")).unwrap()
    }

    #[test]
    fn create_list_spec_delete() {
        let t = tempfile::tempdir().unwrap();
        let p = pool(&t);
        let spec = p.create("vol-1", 8 * MIB).unwrap();
        assert_eq!(
            spec,
            BackendSpec::File {
                path: p.dir().join("vol-1.img")
            }
        );
        assert_eq!(p.spec("vol-1").unwrap(), spec);
        let l = p.list().unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].id, "vol-1");
        assert_eq!(l[0].size, 8 * MIB);
        assert!(!l[0].partial);
        assert!(l[0].allocated < MIB, "a new volume is sparse");
        assert!(matches!(
            p.create("vol-1", 8 * MIB),
            Err(PoolError::AlreadyExists(_))
        ));
        assert_eq!(p.stats().unwrap().provisioned_bytes, 8 * MIB);
        p.delete("vol-1").unwrap();
        p.delete("vol-1").unwrap();
        assert!(p.list().unwrap().is_empty());
        assert!(matches!(p.spec("vol-1"), Err(PoolError::NotFound(_))));
    }

    #[test]
    fn refuses_bad_ids_sizes_and_too_big() {
        let t = tempfile::tempdir().unwrap();
        let p = pool(&t);
        assert!(matches!(
            p.create("../evil", MIB),
            Err(PoolError::InvalidId(_))
        ));
        assert!(matches!(
            p.create("v", 1000),
            Err(PoolError::InvalidSize(1000))
        ));
        let free = p.free_bytes().unwrap();
        let huge = (free / 4096 + 1024) * 4096;
        match p.create("big", huge) {
            Err(PoolError::NoSpace { need, free: f }) => {
                assert_eq!(need, huge);
                assert!(f < need);
            }
            other => panic!("{other:?}"),
        }
        assert!(p.list().unwrap().is_empty(), "nothing allocated");
    }

    #[test]
    fn partial_objects_are_listed_and_deleted() {
        let t = tempfile::tempdir().unwrap();
        let p = pool(&t);
        p.create("done", MIB).unwrap();
        // What a crash in the middle of a create leaves behind.
        std::fs::write(p.dir().join("crashed.img.part"), b"half").unwrap();
        std::fs::write(p.dir().join("unrelated.txt"), b"x").unwrap();
        let l = p.list().unwrap();
        let ids: Vec<_> = l.iter().map(|o| (o.id.as_str(), o.partial)).collect();
        assert_eq!(ids, [("crashed", true), ("done", false)]);
        assert!(matches!(
            p.create("crashed", MIB),
            Err(PoolError::AlreadyExists(_))
        ));
        assert!(matches!(p.spec("crashed"), Err(PoolError::NotFound(_))));
        p.delete("crashed").unwrap();
        assert_eq!(p.list().unwrap().len(), 1);
        p.create("crashed", MIB).unwrap();
    }

    #[test]
    fn clone_copies_bytes_and_stays_sparse() {
        let t = tempfile::tempdir().unwrap();
        let p = pool(&t).with_reflink(Reflink::Never);
        p.create("src", 32 * MIB).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(p.path("src"))
            .unwrap();
        f.seek(SeekFrom::Start(5 * MIB)).unwrap();
        f.write_all(&vec![0x5A; 3 * MIB as usize]).unwrap();
        f.sync_all().unwrap();
        let (spec, method) = p.clone_from("src", "dst").unwrap();
        assert_eq!(spec, p.spec("dst").unwrap());
        match method {
            CloneMethod::Copy(s) => assert_eq!(s.bytes_written, 3 * MIB),
            CloneMethod::Reflink => panic!("reflink disabled"),
        }
        assert_eq!(
            std::fs::read(p.path("src")).unwrap(),
            std::fs::read(p.path("dst")).unwrap()
        );
        let o = p.stat("dst").unwrap();
        assert_eq!(o.size, 32 * MIB);
        assert!(o.allocated <= 4 * MIB, "{o:?}");
        assert!(matches!(
            p.clone_from("src", "dst"),
            Err(PoolError::AlreadyExists(_))
        ));
        assert!(matches!(
            p.clone_from("nope", "x"),
            Err(PoolError::NotFound(_))
        ));
        assert!(!p.list().unwrap().iter().any(|o| o.partial));
    }

    #[test]
    fn clone_auto_uses_reflink_or_falls_back() {
        let t = tempfile::tempdir().unwrap();
        let p = pool(&t);
        p.create("src", 4 * MIB).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(p.path("src"))
            .unwrap()
            .write_all(b"hello")
            .unwrap();
        let (_, method) = p.clone_from("src", "dst").unwrap();
        // ext4/tmpfs copy, btrfs/XFS reflink; either way the bytes match.
        let _ = method;
        assert_eq!(
            std::fs::read(p.path("src")).unwrap(),
            std::fs::read(p.path("dst")).unwrap()
        );
    }

    #[test]
    fn resize_grows_only() {
        let t = tempfile::tempdir().unwrap();
        let p = pool(&t);
        p.create("v", MIB).unwrap();
        p.resize("v", 4 * MIB).unwrap();
        assert_eq!(p.stat("v").unwrap().size, 4 * MIB);
        p.resize("v", 4 * MIB).unwrap();
        assert!(matches!(p.resize("v", MIB), Err(PoolError::Shrink { .. })));
        assert!(matches!(
            p.resize("missing", MIB),
            Err(PoolError::NotFound(_))
        ));
    }
}
