//! A deterministic scheduler for simulation tests, and the locks the overlay
//! and cache use so that it can see them.
//!
//! Threads spawned by [`Sched::spawn`] run one at a time: a thread runs until
//! it reaches a yield point (every simulated storage operation, and every
//! contended [`Mutex`] or [`RwLock`]), then the scheduler hands the turn to
//! a thread chosen by a seeded generator. The same seed gives the same
//! interleaving, so a failing crash point can be replayed. Outside a
//! scheduler (production) the yield points do nothing and the locks are
//! plain std locks.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::{Arc, MutexGuard, RwLockReadGuard, RwLockWriteGuard};
use std::thread::{JoinHandle, Thread};

thread_local! {
    static CURRENT: RefCell<Option<(Arc<Sched>, usize)>> = const { RefCell::new(None) };
}

pub struct Sched {
    state: std::sync::Mutex<State>,
}

struct State {
    running: Option<usize>,
    /// Each scheduled thread, to wake it alone when its turn comes.
    threads: BTreeMap<usize, Thread>,
    /// Threads waiting for a turn, in a deterministic order.
    ready: Vec<usize>,
    next_id: usize,
    started: bool,
    rng: u64,
}

impl Sched {
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(Sched {
            state: std::sync::Mutex::new(State {
                running: None,
                threads: BTreeMap::new(),
                ready: Vec::new(),
                next_id: 0,
                started: false,
                rng: seed ^ 0x9e37_79b9_7f4a_7c15,
            }),
        })
    }

    /// Spawns a thread that runs only when the scheduler gives it a turn.
    /// Threads start running at [`Sched::run`].
    pub fn spawn<T: Send + 'static>(self: &Arc<Self>, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
        let id = {
            let mut st = self.lock();
            let id = st.next_id;
            st.next_id += 1;
            st.ready.push(id);
            id
        };
        let sched = self.clone();
        let handle = std::thread::spawn(move || {
            CURRENT.with(|c| *c.borrow_mut() = Some((sched.clone(), id)));
            let _done = Finish(sched.clone());
            sched.wait_turn(id);
            f()
        });
        self.lock().threads.insert(id, handle.thread().clone());
        handle
    }

    /// Starts the spawned threads; join them to wait for the end.
    pub fn run(&self) {
        let mut st = self.lock();
        st.started = true;
        if st.running.is_none() {
            pick(&mut st);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_turn(&self, id: usize) {
        while self.lock().running != Some(id) {
            std::thread::park();
        }
    }

    fn switch(&self, id: usize) {
        {
            let mut st = self.lock();
            st.ready.push(id);
            pick(&mut st);
        }
        self.wait_turn(id);
    }
}

fn pick(st: &mut State) {
    // splitmix64: small, seeded, and the same everywhere.
    st.rng = st.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = st.rng;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    st.running = if st.ready.is_empty() || !st.started {
        None
    } else {
        let i = (z % st.ready.len() as u64) as usize;
        Some(st.ready.swap_remove(i))
    };
    // A thread registers its handle just after it starts; one that is not
    // registered yet finds its turn when it first looks.
    if let Some(t) = st.running.and_then(|id| st.threads.get(&id)) {
        t.unpark();
    }
}

/// Gives the turn away when a scheduled thread ends, even by panic.
struct Finish(Arc<Sched>);

impl Drop for Finish {
    fn drop(&mut self) {
        CURRENT.with(|c| *c.borrow_mut() = None);
        let mut st = self.0.lock();
        pick(&mut st);
    }
}

/// A yield point: under a scheduler, lets it run another thread.
pub fn yield_now() {
    let cur = CURRENT.with(|c| c.borrow().clone());
    if let Some((sched, id)) = cur {
        sched.switch(id);
    }
}

fn scheduled() -> bool {
    CURRENT.with(|c| c.borrow().is_some())
}

/// A mutex that yields to the scheduler instead of blocking when contended,
/// and ignores poisoning (the data it guards stays consistent).
#[derive(Debug, Default)]
pub struct Mutex<T>(std::sync::Mutex<T>);

impl<T> Mutex<T> {
    pub fn new(v: T) -> Self {
        Mutex(std::sync::Mutex::new(v))
    }

    pub fn lock(&self) -> MutexGuard<'_, T> {
        if scheduled() {
            loop {
                match self.0.try_lock() {
                    Ok(g) => return g,
                    Err(std::sync::TryLockError::Poisoned(e)) => return e.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) => yield_now(),
                }
            }
        }
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A reader-writer lock with the same behaviour as [`Mutex`].
#[derive(Debug, Default)]
pub struct RwLock<T>(std::sync::RwLock<T>);

impl<T> RwLock<T> {
    pub fn new(v: T) -> Self {
        RwLock(std::sync::RwLock::new(v))
    }

    pub fn read(&self) -> RwLockReadGuard<'_, T> {
        if scheduled() {
            loop {
                match self.0.try_read() {
                    Ok(g) => return g,
                    Err(std::sync::TryLockError::Poisoned(e)) => return e.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) => yield_now(),
                }
            }
        }
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, T> {
        if scheduled() {
            loop {
                match self.0.try_write() {
                    Ok(g) => return g,
                    Err(std::sync::TryLockError::Poisoned(e)) => return e.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) => yield_now(),
                }
            }
        }
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(seed: u64) -> Vec<usize> {
        let sched = Sched::new(seed);
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let handles: Vec<_> = (0..3)
            .map(|t| {
                let log = log.clone();
                sched.spawn(move || {
                    for _ in 0..5 {
                        log.lock().unwrap().push(t);
                        yield_now();
                    }
                })
            })
            .collect();
        sched.run();
        for h in handles {
            h.join().unwrap();
        }
        Arc::try_unwrap(log).unwrap().into_inner().unwrap()
    }

    #[test]
    fn same_seed_same_interleaving_and_seeds_differ() {
        let a = trace(1);
        assert_eq!(a.len(), 15);
        assert_eq!(a, trace(1));
        assert!((2..20).any(|s| trace(s) != a), "the seed must change the interleaving");
    }

    #[test]
    fn contended_mutex_yields_to_its_holder() {
        let sched = Sched::new(7);
        let m = Arc::new(Mutex::new(0u32));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                sched.spawn(move || {
                    for _ in 0..10 {
                        let mut g = m.lock();
                        let v = *g;
                        yield_now(); // another thread may try the lock here
                        *g = v + 1;
                    }
                })
            })
            .collect();
        sched.run();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(*m.lock(), 40);
    }
}
