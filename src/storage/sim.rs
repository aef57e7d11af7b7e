//! A simulated disk for tests: in memory, deterministic, seeded.
//!
//! Every file keeps what is durable apart from what was written since its
//! last sync; every directory keeps its durable entries apart from the
//! creates, renames and removals since its last sync. The disk can lose
//! power at a chosen operation: that operation and every later one fail
//! with EIO until [`SimStorage::power_cut`], which keeps, per 512-byte
//! sector, a random prefix of the unsynced writes to it (so unsynced writes
//! survive or not, in any order across sectors, and a write may be torn at a
//! sector boundary) and a random prefix of each directory's unsynced
//! operations. [`SimStorage::process_crash`] models the daemon dying while
//! the machine stays up: nothing written is lost. ENOSPC and EIO can be
//! injected at chosen operations, and while the disk is "full" writes and
//! allocations that need space their file does not have fail with ENOSPC.
//! Every operation is a yield point of the [`super::sched`] scheduler.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{errno, parent_of, sched, IoRange, LockGuard, Storage, StorageFile};

const SECTOR: u64 = 512;
const PAGE: u64 = 4096;

/// The kind of a storage operation, for injecting faults into some kinds only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    Sync,
    SetLen,
    Allocate,
    PunchHole,
    Namespace,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    File(usize),
    Dir,
}

#[derive(Clone, Debug)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
    PunchHole { offset: u64, len: u64 },
}

#[derive(Clone, Debug, Default)]
struct Inode {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<Pending>,
    /// 4 KiB pages with space on the device: a full device fails writes
    /// and allocations that need more.
    allocated: BTreeSet<u64>,
}

impl Inode {
    /// Gives `offset..offset+len` space on the device, unless it is full.
    fn take_space(&mut self, full: bool, offset: u64, len: u64) -> io::Result<()> {
        let pages = offset / PAGE..(offset + len).div_ceil(PAGE);
        if full && pages.clone().any(|p| !self.allocated.contains(&p)) {
            return Err(errno(libc::ENOSPC));
        }
        self.allocated.extend(pages);
        Ok(())
    }
}

#[derive(Clone, Debug)]
enum DirOp {
    Link(PathBuf, usize),
    Unlink(PathBuf),
    Rename(PathBuf, PathBuf, usize),
}

/// An injected fault: operation number `at` (or every matching operation
/// while `sticky`) of kind `kind` on a path containing `path` fails.
#[derive(Clone, Debug)]
struct Fault {
    at: Option<u64>,
    kind: Option<OpKind>,
    path: Option<String>,
    errno: i32,
}

#[derive(Default)]
struct State {
    inodes: Vec<Inode>,
    names: BTreeMap<PathBuf, Entry>,
    durable_names: BTreeMap<PathBuf, Entry>,
    dir_ops: BTreeMap<PathBuf, Vec<DirOp>>,
    ops: u64,
    power_fails_at: Option<u64>,
    dead: bool,
    faults: Vec<Fault>,
    full: bool,
    boot: u64,
    locks: BTreeSet<PathBuf>,
    rng: u64,
}

impl State {
    fn next(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Counts an operation and decides whether it fails.
    fn begin(&mut self, kind: OpKind, path: &Path) -> io::Result<()> {
        self.ops += 1;
        if self.power_fails_at == Some(self.ops) {
            self.dead = true;
        }
        if self.dead {
            return Err(errno(libc::EIO));
        }
        let n = self.ops;
        let p = path.to_string_lossy();
        if let Some(i) = self.faults.iter().position(|f| {
            f.at.is_none_or(|at| at == n)
                && f.kind.is_none_or(|k| k == kind)
                && f.path.as_deref().is_none_or(|s| p.contains(s))
        }) {
            let f = self.faults[i].clone();
            if f.at.is_some() {
                self.faults.remove(i);
            }
            return Err(errno(f.errno));
        }
        Ok(())
    }

    fn lookup(&self, path: &Path) -> io::Result<usize> {
        match self.names.get(path) {
            Some(Entry::File(ino)) => Ok(*ino),
            Some(Entry::Dir) => Err(errno(libc::EISDIR)),
            None => Err(errno(libc::ENOENT)),
        }
    }

    fn dir_op(&mut self, path: &Path, op: DirOp) {
        self.dir_ops.entry(parent_of(path)).or_default().push(op);
    }
}

/// The simulated disk. Clones share it.
#[derive(Clone)]
pub struct SimStorage {
    state: Arc<Mutex<State>>,
}

impl SimStorage {
    pub fn new(seed: u64) -> Self {
        let mut st = State {
            rng: seed,
            ..State::default()
        };
        st.names.insert(PathBuf::from("/"), Entry::Dir);
        st.durable_names.insert(PathBuf::from("/"), Entry::Dir);
        SimStorage {
            state: Arc::new(Mutex::new(st)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Operations performed so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// The power fails at operation number `op` (counting from the start):
    /// it and every later operation fail with EIO until [`Self::power_cut`].
    pub fn power_fails_at(&self, op: u64) {
        self.lock().power_fails_at = Some(op);
    }

    /// True once the power has failed.
    pub fn is_dead(&self) -> bool {
        self.lock().dead
    }

    /// Operation number `at` fails with `errno` if it is of `kind` (any kind
    /// if `None`).
    pub fn fail_op(&self, at: u64, kind: Option<OpKind>, errno: i32) {
        self.lock().faults.push(Fault {
            at: Some(at),
            kind,
            path: None,
            errno,
        });
    }

    /// Every operation of `kind` on a path containing `path` fails with
    /// `errno` from now on, until [`Self::clear_faults`].
    pub fn fail_always(&self, kind: OpKind, path: &str, errno: i32) {
        self.lock().faults.push(Fault {
            at: None,
            kind: Some(kind),
            path: Some(path.to_string()),
            errno,
        });
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// While full, writes and allocations that need space not yet allocated
    /// to their file fail with ENOSPC.
    pub fn set_full(&self, full: bool) {
        self.lock().full = full;
    }

    /// The machine restarts after losing power: everything not synced may be
    /// lost (see the module's doc), handles opened before fail, locks are
    /// released, and the boot id changes.
    pub fn power_cut(&self) {
        let mut st = self.lock();
        let st = &mut *st;
        // Directories: a random prefix of each one's unsynced operations.
        let dir_ops = std::mem::take(&mut st.dir_ops);
        for ops in dir_ops.into_values() {
            let keep = (st.next() % (ops.len() as u64 + 1)) as usize;
            for op in ops.into_iter().take(keep) {
                apply_dir_op(&mut st.durable_names, op);
            }
        }
        st.names = st.durable_names.clone();
        // Files: per sector, a random prefix of the unsynced writes to it.
        for ino in 0..st.inodes.len() {
            let pending = std::mem::take(&mut st.inodes[ino].pending);
            let mut image = st.inodes[ino].durable.clone();
            let mut cuts: BTreeMap<u64, bool> = BTreeMap::new();
            for p in pending {
                match p {
                    Pending::SetLen(len) => {
                        if st.next().is_multiple_of(2) {
                            image.resize(len as usize, 0);
                        }
                    }
                    Pending::PunchHole { offset, len } => {
                        for s in offset / SECTOR..(offset + len).div_ceil(SECTOR) {
                            if sector_survives(st, &mut cuts, s) {
                                let lo = (s * SECTOR).max(offset) as usize;
                                let hi = ((s + 1) * SECTOR).min(offset + len).min(image.len() as u64) as usize;
                                if lo < hi {
                                    image[lo..hi].fill(0);
                                }
                            }
                        }
                    }
                    Pending::Write { offset, data } => {
                        let end = offset + data.len() as u64;
                        for s in offset / SECTOR..end.div_ceil(SECTOR) {
                            if sector_survives(st, &mut cuts, s) {
                                let lo = (s * SECTOR).max(offset);
                                let hi = ((s + 1) * SECTOR).min(end);
                                if image.len() < hi as usize {
                                    image.resize(hi as usize, 0);
                                }
                                image[lo as usize..hi as usize]
                                    .copy_from_slice(&data[(lo - offset) as usize..(hi - offset) as usize]);
                            }
                        }
                    }
                }
            }
            let inode = &mut st.inodes[ino];
            inode.durable = image.clone();
            inode.current = image;
        }
        st.dead = false;
        st.power_fails_at = None;
        st.faults.clear();
        st.full = false;
        st.boot += 1;
        st.locks.clear();
    }

    /// The daemon dies and the machine stays up: nothing is lost (the page
    /// cache survives), handles opened before fail, locks are released.
    pub fn process_crash(&self) {
        let mut st = self.lock();
        st.dead = false;
        st.power_fails_at = None;
        st.faults.clear();
        st.full = false;
        st.locks.clear();
        // Handles carry the generation they were opened in; bump it without
        // changing what a power cut would see.
        st.boot += 1 << 32;
    }

    /// The current content of a file, as reads see it.
    pub fn contents(&self, path: &Path) -> io::Result<Vec<u8>> {
        let st = self.lock();
        let ino = st.lookup(path)?;
        Ok(st.inodes[ino].current.clone())
    }

    fn op(&self, kind: OpKind, path: &Path) -> io::Result<MutexGuard<'_, State>> {
        sched::yield_now();
        let mut st = self.lock();
        st.begin(kind, path)?;
        Ok(st)
    }
}

/// Decides once per sector and power cut whether a sector keeps the next
/// unsynced write to it: once one is lost, all later ones are too.
fn sector_survives(st: &mut State, cuts: &mut BTreeMap<u64, bool>, s: u64) -> bool {
    if cuts.get(&s) == Some(&false) {
        return false;
    }
    let keep = !st.next().is_multiple_of(3);
    cuts.insert(s, keep);
    keep
}

fn apply_dir_op(names: &mut BTreeMap<PathBuf, Entry>, op: DirOp) {
    match op {
        DirOp::Link(p, ino) => {
            names.insert(p, Entry::File(ino));
        }
        DirOp::Unlink(p) => {
            names.remove(&p);
        }
        DirOp::Rename(from, to, ino) => {
            names.remove(&from);
            names.insert(to, Entry::File(ino));
        }
    }
}

struct SimFile {
    sim: SimStorage,
    path: PathBuf,
    ino: usize,
    boot: u64,
}

impl SimFile {
    fn op(&self, kind: OpKind) -> io::Result<MutexGuard<'_, State>> {
        let st = self.sim.op(kind, &self.path)?;
        if st.boot != self.boot {
            return Err(errno(libc::EBADF));
        }
        Ok(st)
    }
}

impl Storage for SimStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.op(OpKind::Namespace, dir)?;
        for d in dir.ancestors() {
            if d.as_os_str().is_empty() {
                continue;
            }
            match st.names.get(d) {
                Some(Entry::Dir) => {}
                Some(Entry::File(_)) => return Err(errno(libc::ENOTDIR)),
                None => {
                    st.names.insert(d.to_path_buf(), Entry::Dir);
                    st.durable_names.insert(d.to_path_buf(), Entry::Dir);
                }
            }
        }
        Ok(())
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        let mut st = self.op(OpKind::Namespace, path)?;
        if st.names.get(&parent_of(path)) != Some(&Entry::Dir) {
            return Err(errno(libc::ENOENT));
        }
        let ino = match st.lookup(path) {
            Ok(ino) => ino,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                st.inodes.push(Inode::default());
                let ino = st.inodes.len() - 1;
                st.names.insert(path.to_path_buf(), Entry::File(ino));
                st.dir_op(path, DirOp::Link(path.to_path_buf(), ino));
                ino
            }
            Err(e) => return Err(e),
        };
        let boot = st.boot;
        Ok(Arc::new(SimFile {
            sim: self.clone(),
            path: path.to_path_buf(),
            ino,
            boot,
        }))
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        let st = self.op(OpKind::Namespace, path)?;
        Ok(st.names.contains_key(path))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.op(OpKind::Namespace, from)?;
        if st.names.get(&parent_of(to)) != Some(&Entry::Dir) {
            return Err(errno(libc::ENOENT));
        }
        let ino = st.lookup(from)?;
        st.names.remove(from);
        st.names.insert(to.to_path_buf(), Entry::File(ino));
        // A rename is one operation: it lands whole or not at all, in the
        // order of its directory's other operations (when both names share
        // a directory, as every rename here does).
        st.dir_op(to, DirOp::Rename(from.to_path_buf(), to.to_path_buf(), ino));
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut st = self.op(OpKind::Namespace, path)?;
        st.lookup(path)?;
        st.names.remove(path);
        st.dir_op(path, DirOp::Unlink(path.to_path_buf()));
        Ok(())
    }

    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.op(OpKind::Namespace, dir)?;
        if st.names.get(dir) != Some(&Entry::Dir) {
            return Err(errno(libc::ENOENT));
        }
        // Removing a tree is made durable at once: the tests only need that
        // what was inside is gone after a cut, and it always is here.
        let inside: BTreeSet<PathBuf> = st
            .names
            .keys()
            .chain(st.durable_names.keys())
            .filter(|p| p.starts_with(dir))
            .cloned()
            .collect();
        for p in inside {
            st.names.remove(&p);
            st.durable_names.remove(&p);
            st.dir_ops.remove(&p);
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.op(OpKind::Sync, dir)?;
        if let Some(ops) = st.dir_ops.remove(dir) {
            for op in ops {
                apply_dir_op(&mut st.durable_names, op);
            }
        }
        Ok(())
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let st = self.op(OpKind::Namespace, dir)?;
        if st.names.get(dir) != Some(&Entry::Dir) {
            return Err(errno(libc::ENOENT));
        }
        Ok(st
            .names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }

    fn usage(&self, path: &Path) -> io::Result<u64> {
        let st = self.op(OpKind::Namespace, path)?;
        Ok(st
            .names
            .iter()
            .filter(|(p, _)| p.starts_with(path))
            .filter_map(|(_, e)| match e {
                Entry::File(ino) => Some(st.inodes[*ino].current.len() as u64),
                Entry::Dir => None,
            })
            .sum())
    }

    fn try_lock(&self, path: &Path) -> io::Result<Option<LockGuard>> {
        let mut st = self.op(OpKind::Namespace, path)?;
        if !st.locks.insert(path.to_path_buf()) {
            return Ok(None);
        }
        let boot = st.boot;
        Ok(Some(LockGuard::new(SimLock {
            sim: self.clone(),
            path: path.to_path_buf(),
            boot,
        })))
    }

    fn boot_id(&self) -> io::Result<String> {
        let st = self.op(OpKind::Namespace, Path::new("/"))?;
        Ok(format!("sim-boot-{}", st.boot & 0xffff_ffff))
    }
}

struct SimLock {
    sim: SimStorage,
    path: PathBuf,
    boot: u64,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut st = self.sim.lock();
        if st.boot == self.boot {
            st.locks.remove(&self.path);
        }
    }
}

impl StorageFile for SimFile {
    fn read_at(&self, dst: IoRange, offset: u64) -> io::Result<()> {
        let st = self.op(OpKind::Read)?;
        let cur = &st.inodes[self.ino].current;
        let mut buf = vec![0u8; dst.len()];
        let lo = (offset as usize).min(cur.len());
        let hi = (offset as usize).saturating_add(buf.len()).min(cur.len());
        buf[..hi - lo].copy_from_slice(&cur[lo..hi]);
        dst.copy_from(&buf);
        Ok(())
    }

    fn write_at(&self, src: IoRange, offset: u64) -> io::Result<()> {
        let mut st = self.op(OpKind::Write)?;
        let mut data = vec![0u8; src.len()];
        src.copy_to(&mut data);
        let full = st.full;
        let inode = &mut st.inodes[self.ino];
        inode.take_space(full, offset, data.len() as u64)?;
        let end = offset as usize + data.len();
        if inode.current.len() < end {
            inode.current.resize(end, 0);
        }
        inode.current[offset as usize..end].copy_from_slice(&data);
        inode.pending.push(Pending::Write { offset, data });
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut st = self.op(OpKind::Sync)?;
        let inode = &mut st.inodes[self.ino];
        inode.durable = inode.current.clone();
        inode.pending.clear();
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let st = self.op(OpKind::Read)?;
        Ok(st.inodes[self.ino].current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.op(OpKind::SetLen)?;
        let inode = &mut st.inodes[self.ino];
        inode.current.resize(len as usize, 0);
        inode.pending.push(Pending::SetLen(len));
        Ok(())
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut st = self.op(OpKind::Allocate)?;
        let full = st.full;
        let inode = &mut st.inodes[self.ino];
        inode.take_space(full, offset, len)?;
        let end = (offset + len) as usize;
        if inode.current.len() < end {
            inode.current.resize(end, 0);
            inode.pending.push(Pending::SetLen(end as u64));
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut st = self.op(OpKind::PunchHole)?;
        let inode = &mut st.inodes[self.ino];
        let lo = (offset as usize).min(inode.current.len());
        let hi = (offset + len).min(inode.current.len() as u64) as usize;
        inode.current[lo..hi].fill(0);
        inode.pending.push(Pending::PunchHole { offset, len });
        for p in offset.div_ceil(PAGE)..(offset + len) / PAGE {
            inode.allocated.remove(&p);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(f: &Arc<dyn StorageFile>, off: u64, byte: u8, len: usize) {
        f.write_all_at(&vec![byte; len], off).unwrap();
    }

    #[test]
    fn synced_data_survives_a_power_cut_and_unsynced_data_may_not() {
        let mut lost_some = false;
        let mut kept_some = false;
        for seed in 0..64 {
            let sim = SimStorage::new(seed);
            sim.create_dir_all(Path::new("/d")).unwrap();
            let f = sim.open(Path::new("/d/f"), true).unwrap();
            write(&f, 0, 1, 4096);
            f.sync_data().unwrap();
            sim.sync_dir(Path::new("/d")).unwrap();
            write(&f, 1024, 2, 2048);
            sim.power_cut();
            assert!(f.sync_data().is_err(), "a handle from before the cut still works");
            let data = sim.contents(Path::new("/d/f")).unwrap();
            assert_eq!(data.len(), 4096);
            assert!(data[..1024].iter().chain(&data[3072..]).all(|&b| b == 1));
            for s in data[1024..3072].chunks(512) {
                assert!(
                    s.iter().all(|&b| b == 1) || s.iter().all(|&b| b == 2),
                    "torn inside a sector"
                );
                lost_some |= s[0] == 1;
                kept_some |= s[0] == 2;
            }
        }
        assert!(lost_some && kept_some);
    }

    #[test]
    fn unsynced_renames_may_be_undone_and_synced_ones_stay() {
        let mut undone = false;
        for seed in 0..32 {
            let sim = SimStorage::new(seed);
            sim.create_dir_all(Path::new("/d")).unwrap();
            let f = sim.open(Path::new("/d/a"), true).unwrap();
            f.sync_data().unwrap();
            sim.sync_dir(Path::new("/d")).unwrap();
            sim.rename(Path::new("/d/a"), Path::new("/d/b")).unwrap();
            sim.power_cut();
            let names = sim.read_dir(Path::new("/d")).unwrap();
            assert!(names == ["a"] || names == ["b"], "{names:?}");
            undone |= names == ["a"];
            sim.rename(Path::new(&format!("/d/{}", names[0])), Path::new("/d/c"))
                .unwrap();
            sim.sync_dir(Path::new("/d")).unwrap();
            sim.power_cut();
            assert_eq!(sim.read_dir(Path::new("/d")).unwrap(), ["c"]);
        }
        assert!(undone);
    }

    #[test]
    fn power_fails_at_the_chosen_operation_and_process_crash_keeps_everything() {
        let sim = SimStorage::new(3);
        sim.create_dir_all(Path::new("/d")).unwrap();
        let f = sim.open(Path::new("/d/f"), true).unwrap();
        let at = sim.ops() + 2;
        sim.power_fails_at(at);
        write(&f, 0, 7, 100);
        assert!(f.write_all_at(&[8; 100], 0).is_err());
        assert!(sim.is_dead());
        assert!(f.read_exact_at(&mut [0; 4], 0).is_err());
        sim.process_crash();
        let f = sim.open(Path::new("/d/f"), false).unwrap();
        let mut b = [0u8; 100];
        f.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(b, [7; 100]);
        sim.set_full(true);
        f.write_all_at(&[1], 0).expect("space the file has needs no more");
        assert_eq!(
            f.write_all_at(&[1], 1 << 20).unwrap_err().raw_os_error(),
            Some(libc::ENOSPC)
        );
        f.sync_data().unwrap();
        sim.set_full(false);
        f.write_all_at(&[1], 1 << 20).unwrap();
    }
}
