//! An in-memory FUSE file system that can lose power. Every file keeps,
//! beside its current content, the content it had at its last fsync (or
//! fdatasync); every directory keeps the entries it had at its last fsync.
//! [`PowerCutFs::cut_power`] throws away what was never synced, as a machine
//! losing power does, while the mount stays up for the next "boot".
//!
//! The test process serves it on a thread of its own (fuser, no libfuse and
//! no fusermount: root mounts /dev/fuse directly). Files are opened with
//! FOPEN_DIRECT_IO and every entry and attribute has a zero TTL, so the
//! kernel caches nothing that could hide a cut.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, MountOption, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};

const PAGE: u64 = 4096;
/// Nothing is cached by the kernel: every lookup and getattr comes here.
const TTL: Duration = Duration::ZERO;

/// What a power cut keeps of the data that was written but never synced.
#[derive(Clone, Copy, Debug)]
pub enum Cut {
    /// Nothing: every file reverts to its content as of its last sync.
    DropAll,
    /// A random part, page by page (and each file's size change, or not),
    /// as a device whose cache had written some of it back; seeded.
    /// Directories lose their unsynced changes either way.
    RandomWriteback(u64),
}

/// What one cut undid.
#[derive(Debug, Default)]
pub struct CutReport {
    /// Unsynced file pages dropped.
    pub pages_dropped: u64,
    /// Unsynced file pages that the write-back mode kept.
    pub pages_kept: u64,
    /// Directories whose unsynced changes of entries were undone.
    pub dirs_reverted: u64,
}

/// File content: sparse 4 KiB pages and a size; absent pages read as zeros.
#[derive(Clone, Default)]
struct Content {
    pages: HashMap<u64, Box<[u8]>>,
    size: u64,
}

impl Content {
    fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        let end = (offset + len).min(self.size);
        if end <= offset {
            return Vec::new();
        }
        let mut out = vec![0u8; (end - offset) as usize];
        let mut pos = offset;
        while pos < end {
            let page = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let n = ((PAGE - pos % PAGE).min(end - pos)) as usize;
            if let Some(p) = self.pages.get(&page) {
                let at = (pos - offset) as usize;
                out[at..at + n].copy_from_slice(&p[in_page..in_page + n]);
            }
            pos += n as u64;
        }
        out
    }

    /// Writes `data` at `offset`; returns the pages touched.
    fn write(&mut self, offset: u64, data: &[u8], touched: &mut BTreeSet<u64>) {
        let mut pos = offset;
        let end = offset + data.len() as u64;
        while pos < end {
            let page = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let n = ((PAGE - pos % PAGE).min(end - pos)) as usize;
            let p = self
                .pages
                .entry(page)
                .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            let at = (pos - offset) as usize;
            p[in_page..in_page + n].copy_from_slice(&data[at..at + n]);
            touched.insert(page);
            pos += n as u64;
        }
        self.size = self.size.max(end);
    }

    /// Zeros `offset..offset+len` inside the file (never extends it).
    fn zero(&mut self, offset: u64, len: u64, touched: &mut BTreeSet<u64>) {
        let end = (offset + len).min(self.size);
        let mut pos = offset;
        while pos < end {
            let page = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let n = ((PAGE - pos % PAGE).min(end - pos)) as usize;
            if let Some(p) = self.pages.get_mut(&page) {
                if n == PAGE as usize {
                    self.pages.remove(&page);
                } else {
                    p[in_page..in_page + n].fill(0);
                }
                touched.insert(page);
            }
            pos += n as u64;
        }
    }

    /// Sets the size; bytes past it are gone (and read as zeros if the file
    /// grows again).
    fn set_size(&mut self, size: u64, touched: &mut BTreeSet<u64>) {
        if size < self.size {
            let first = size / PAGE;
            let gone: Vec<u64> = self.pages.keys().copied().filter(|&p| p >= first).collect();
            for p in gone {
                touched.insert(p);
                if p == first && !size.is_multiple_of(PAGE) {
                    self.pages.get_mut(&p).unwrap()[(size % PAGE) as usize..].fill(0);
                } else {
                    self.pages.remove(&p);
                }
            }
        }
        self.size = size;
    }
}

struct FileNode {
    cur: Content,
    durable: Content,
    /// Pages of `cur` that may differ from `durable`.
    dirty: BTreeSet<u64>,
}

impl FileNode {
    fn sync(&mut self) {
        let pages = std::mem::take(&mut self.dirty);
        for p in pages {
            self.persist_page(p);
        }
        self.persist_size(self.cur.size);
    }

    fn persist_page(&mut self, p: u64) {
        match self.cur.pages.get(&p) {
            Some(d) => {
                self.durable.pages.insert(p, d.clone());
            }
            None => {
                self.durable.pages.remove(&p);
            }
        }
    }

    /// Makes `size` the durable size: durable bytes past it are gone (a
    /// page written back past an end that was not is lost with it).
    fn persist_size(&mut self, size: u64) {
        let end_page = size.div_ceil(PAGE);
        self.durable.pages.retain(|&p, _| p < end_page);
        if !size.is_multiple_of(PAGE) {
            if let Some(p) = self.durable.pages.get_mut(&(size / PAGE)) {
                p[(size % PAGE) as usize..].fill(0);
            }
        }
        self.durable.size = size;
    }
}

enum Kind {
    File(FileNode),
    Dir {
        cur: BTreeMap<String, u64>,
        durable: BTreeMap<String, u64>,
        parent: u64,
    },
}

struct Node {
    kind: Kind,
    perm: u16,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
}

struct State {
    /// Every inode ever made: an unlinked file can come back if its name was
    /// never durably removed, so inodes are never freed (tests are small).
    nodes: HashMap<u64, Node>,
    next_ino: u64,
}

/// The file system state, shared by the FUSE server thread and the test.
#[derive(Clone)]
pub struct PowerCutFs {
    state: Arc<Mutex<State>>,
}

impl State {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let n = self.nodes.get(&ino)?;
        let (kind, size, nlink) = match &n.kind {
            Kind::File(f) => (FileType::RegularFile, f.cur.size, 1),
            Kind::Dir { .. } => (FileType::Directory, 0, 2),
        };
        let blocks = match &n.kind {
            Kind::File(f) => f.cur.pages.len() as u64 * (PAGE / 512),
            Kind::Dir { .. } => 0,
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks,
            atime: n.mtime,
            mtime: n.mtime,
            ctime: n.mtime,
            crtime: n.mtime,
            kind,
            perm: n.perm,
            nlink,
            uid: n.uid,
            gid: n.gid,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    fn entries(&mut self, dir: u64) -> Result<&mut BTreeMap<String, u64>, Errno> {
        match self.nodes.get_mut(&dir).map(|n| &mut n.kind) {
            Some(Kind::Dir { cur, .. }) => Ok(cur),
            Some(Kind::File(_)) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn file(&mut self, ino: u64) -> Result<&mut FileNode, Errno> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.kind) {
            Some(Kind::File(f)) => Ok(f),
            Some(Kind::Dir { .. }) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn is_empty_dir(&self, ino: u64) -> bool {
        matches!(self.nodes.get(&ino).map(|n| &n.kind), Some(Kind::Dir { cur, .. }) if cur.is_empty())
    }

    fn make(&mut self, parent: u64, name: &OsStr, kind: Kind, mode: u32, req: &Request) -> Result<u64, Errno> {
        let name = name.to_str().ok_or(Errno::EINVAL)?.to_string();
        if self.entries(parent)?.contains_key(&name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(
            ino,
            Node {
                kind,
                perm: (mode & 0o7777) as u16,
                uid: req.uid(),
                gid: req.gid(),
                mtime: SystemTime::now(),
            },
        );
        self.entries(parent)?.insert(name, ino);
        Ok(ino)
    }
}

fn new_file() -> Kind {
    Kind::File(FileNode {
        cur: Content::default(),
        durable: Content::default(),
        dirty: BTreeSet::new(),
    })
}

impl PowerCutFs {
    pub fn new() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            1,
            Node {
                kind: Kind::Dir {
                    cur: BTreeMap::new(),
                    durable: BTreeMap::new(),
                    parent: 1,
                },
                perm: 0o755,
                uid: 0,
                gid: 0,
                mtime: SystemTime::now(),
            },
        );
        PowerCutFs {
            state: Arc::new(Mutex::new(State { nodes, next_ino: 2 })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in a handler must not wedge the mount (the kernel would
        // wait on it forever): carry on with the data as it is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops everything not synced: each file reverts to its content as of
    /// its last fsync (in write-back mode, keeps a random part of the rest),
    /// each directory to its entries as of its last fsync. Call it only while
    /// no process uses the file system (the daemon was killed and reaped).
    pub fn cut_power(&self, cut: Cut) -> CutReport {
        let mut s = self.lock();
        let mut report = CutReport::default();
        let mut rng = match cut {
            Cut::DropAll => None,
            Cut::RandomWriteback(seed) => Some(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
        };
        let mut coin = move || match rng.as_mut() {
            None => false,
            Some(x) => {
                *x ^= *x << 13;
                *x ^= *x >> 7;
                *x ^= *x << 17;
                *x >> 63 == 1
            }
        };
        let mut inos: Vec<u64> = s.nodes.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            match &mut s.nodes.get_mut(&ino).unwrap().kind {
                Kind::File(f) => {
                    let dirty = std::mem::take(&mut f.dirty);
                    for p in dirty {
                        if coin() {
                            f.persist_page(p);
                            report.pages_kept += 1;
                        } else {
                            report.pages_dropped += 1;
                        }
                    }
                    let size = if coin() { f.cur.size } else { f.durable.size };
                    f.persist_size(size);
                    f.cur = f.durable.clone();
                }
                Kind::Dir { cur, durable, .. } => {
                    if cur != durable {
                        report.dirs_reverted += 1;
                        *cur = durable.clone();
                    }
                }
            }
        }
        report
    }
}

impl Default for PowerCutFs {
    fn default() -> Self {
        Self::new()
    }
}

impl fuser::Filesystem for PowerCutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut s = self.lock();
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        let found = match s.entries(parent.0) {
            Ok(e) => e.get(name).copied(),
            Err(e) => return reply.error(e),
        };
        match found.and_then(|ino| s.attr(ino)) {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.lock().attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = self.lock();
        if let Some(size) = size {
            match s.file(ino.0) {
                Ok(f) => {
                    let mut touched = std::mem::take(&mut f.dirty);
                    f.cur.set_size(size, &mut touched);
                    // A size change is unsynced too: the next sync takes it
                    // (persist_size), a cut reverts it.
                    f.dirty = touched;
                }
                Err(e) => return reply.error(e),
            }
        }
        let Some(n) = s.nodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(mode) = mode {
            n.perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = uid {
            n.uid = uid;
        }
        if let Some(gid) = gid {
            n.gid = gid;
        }
        n.mtime = SystemTime::now();
        let attr = s.attr(ino.0).unwrap();
        reply.attr(&TTL, &attr);
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EPERM);
        }
        let mut s = self.lock();
        match s.make(parent.0, name, new_file(), mode, req) {
            Ok(ino) => reply.entry(&TTL, &s.attr(ino).unwrap(), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let mut s = self.lock();
        let dir = Kind::Dir {
            cur: BTreeMap::new(),
            durable: BTreeMap::new(),
            parent: parent.0,
        };
        match s.make(parent.0, name, dir, mode, req) {
            Ok(ino) => reply.entry(&TTL, &s.attr(ino).unwrap(), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.lock();
        let name = name.to_string_lossy().into_owned();
        let ino = match s.entries(parent.0) {
            Ok(e) => e.get(&name).copied(),
            Err(e) => return reply.error(e),
        };
        match ino.map(|i| s.file(i).map(|_| ())) {
            None => reply.error(Errno::ENOENT),
            Some(Err(e)) => reply.error(e),
            Some(Ok(())) => {
                s.entries(parent.0).unwrap().remove(&name);
                reply.ok()
            }
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.lock();
        let name = name.to_string_lossy().into_owned();
        let ino = match s.entries(parent.0) {
            Ok(e) => e.get(&name).copied(),
            Err(e) => return reply.error(e),
        };
        let Some(ino) = ino else {
            return reply.error(Errno::ENOENT);
        };
        if !matches!(s.nodes.get(&ino).map(|n| &n.kind), Some(Kind::Dir { .. })) {
            return reply.error(Errno::ENOTDIR);
        }
        if !s.is_empty_dir(ino) {
            return reply.error(Errno::ENOTEMPTY);
        }
        s.entries(parent.0).unwrap().remove(&name);
        reply.ok()
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        let (name, newname) = (
            name.to_string_lossy().into_owned(),
            newname.to_string_lossy().into_owned(),
        );
        let noreplace = flags.bits() & libc::RENAME_NOREPLACE != 0;
        if flags.bits() & !libc::RENAME_NOREPLACE != 0 {
            return reply.error(Errno::EINVAL);
        }
        let ino = match s.entries(parent.0) {
            Ok(e) => match e.get(&name) {
                Some(&i) => i,
                None => return reply.error(Errno::ENOENT),
            },
            Err(e) => return reply.error(e),
        };
        let target = match s.entries(newparent.0) {
            Ok(e) => e.get(&newname).copied(),
            Err(e) => return reply.error(e),
        };
        if let Some(t) = target {
            if t == ino {
                return reply.ok();
            }
            if noreplace {
                return reply.error(Errno::EEXIST);
            }
            let t_dir = matches!(s.nodes[&t].kind, Kind::Dir { .. });
            let dir = matches!(s.nodes[&ino].kind, Kind::Dir { .. });
            if t_dir && !dir {
                return reply.error(Errno::EISDIR);
            }
            if dir && !t_dir {
                return reply.error(Errno::ENOTDIR);
            }
            if t_dir && !s.is_empty_dir(t) {
                return reply.error(Errno::ENOTEMPTY);
            }
        }
        s.entries(parent.0).unwrap().remove(&name);
        s.entries(newparent.0).unwrap().insert(newname, ino);
        if let Some(Kind::Dir { parent: p, .. }) = s.nodes.get_mut(&ino).map(|n| &mut n.kind) {
            *p = newparent.0;
        }
        reply.ok()
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.lock().file(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.lock();
        let existing = match s.entries(parent.0) {
            Ok(e) => name.to_str().and_then(|n| e.get(n).copied()),
            Err(e) => return reply.error(e),
        };
        let ino = match existing {
            Some(_) if flags & libc::O_EXCL != 0 => return reply.error(Errno::EEXIST),
            Some(ino) => {
                match s.file(ino) {
                    Ok(f) if flags & libc::O_TRUNC != 0 => {
                        let mut touched = std::mem::take(&mut f.dirty);
                        f.cur.set_size(0, &mut touched);
                        f.dirty = touched;
                    }
                    Ok(_) => {}
                    Err(e) => return reply.error(e),
                }
                ino
            }
            None => match s.make(parent.0, name, new_file(), mode, req) {
                Ok(ino) => ino,
                Err(e) => return reply.error(e),
            },
        };
        let attr = s.attr(ino).unwrap();
        reply.created(&TTL, &attr, Generation(0), FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        match self.lock().file(ino.0) {
            Ok(f) => reply.data(&f.cur.read(offset, size as u64)),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = self.lock();
        match s.file(ino.0) {
            Ok(f) => {
                let mut touched = std::mem::take(&mut f.dirty);
                f.cur.write(offset, data, &mut touched);
                f.dirty = touched;
                reply.written(data.len() as u32)
            }
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lo: fuser::LockOwner, reply: ReplyEmpty) {
        // close(2) syncs nothing.
        reply.ok()
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // fdatasync and fsync alike make data and size durable (metadata
        // beyond the size is not modelled).
        match self.lock().file(ino.0) {
            Ok(f) => {
                f.sync();
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let s = self.lock();
        let (entries, parent) = match s.nodes.get(&ino.0).map(|n| &n.kind) {
            Some(Kind::Dir { cur, parent, .. }) => (cur, *parent),
            Some(Kind::File(_)) => return reply.error(Errno::ENOTDIR),
            None => return reply.error(Errno::ENOENT),
        };
        let mut all: Vec<(u64, FileType, String)> = vec![
            (ino.0, FileType::Directory, ".".into()),
            (parent, FileType::Directory, "..".into()),
        ];
        for (name, &i) in entries {
            let kind = match s.nodes.get(&i).map(|n| &n.kind) {
                Some(Kind::Dir { .. }) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            all.push((i, kind, name.clone()));
        }
        for (i, (ino, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok()
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.lock().nodes.get_mut(&ino.0).map(|n| &mut n.kind) {
            Some(Kind::Dir { cur, durable, .. }) => {
                *durable = cur.clone();
                reply.ok()
            }
            Some(Kind::File(_)) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = 1u64 << 24;
        reply.statfs(
            blocks,
            blocks / 2,
            blocks / 2,
            1 << 20,
            1 << 19,
            PAGE as u32,
            255,
            PAGE as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok()
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        let f = match s.file(ino.0) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        let mut touched = std::mem::take(&mut f.dirty);
        let end = offset + length;
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let result = match mode & !libc::FALLOC_FL_KEEP_SIZE {
            // Plain allocation: nothing to reserve in memory, but the file
            // grows (an unsynced size change like any other).
            0 => {
                if !keep_size && end > f.cur.size {
                    f.cur.set_size(end, &mut touched);
                }
                Ok(())
            }
            libc::FALLOC_FL_PUNCH_HOLE if keep_size => {
                f.cur.zero(offset, length, &mut touched);
                Ok(())
            }
            libc::FALLOC_FL_ZERO_RANGE => {
                f.cur.zero(offset, length, &mut touched);
                if !keep_size && end > f.cur.size {
                    f.cur.set_size(end, &mut touched);
                }
                Ok(())
            }
            _ => Err(Errno::EOPNOTSUPP),
        };
        f.dirty = touched;
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

/// A mounted [`PowerCutFs`]; unmounts (lazily) when dropped.
pub struct PowerCutMount {
    pub fs: PowerCutFs,
    path: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl PowerCutMount {
    /// Mounts a fresh, empty file system on the directory `path` (needs
    /// root and /dev/fuse; panics with the reason otherwise).
    pub fn mount(path: &Path) -> PowerCutMount {
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: the power-cut test needs FUSE (modprobe fuse)"
        );
        let fs = PowerCutFs::new();
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("powercutfs".into()),
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
        ];
        // allow_other: the daemon is another process (root too, but say so).
        config.acl = SessionACL::All;
        let session = fuser::spawn_mount(fs.clone(), path, &config)
            .unwrap_or_else(|e| panic!("mount the power-cut FUSE file system on {}: {e}", path.display()));
        let m = PowerCutMount {
            fs,
            path: path.to_path_buf(),
            session: Some(session),
        };
        // The mount answers before the test goes on.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_dir(path).is_err() {
            assert!(
                Instant::now() < deadline,
                "FUSE mount at {} never answered",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        m
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PowerCutMount {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        let c = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: umount2(2) with a valid NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        // Dropping the session unmounts too (already done) and leaves its
        // thread to end when the kernel closes the connection; wait a little
        // for that, never forever (a stray process may still hold the mount).
        let guard = &session.guard;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !guard.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if session.guard.is_finished() {
            let _ = session.join();
        } else {
            drop(session);
        }
    }
}
