//! When an image's first boot is over: its first guest attached, made
//! [`BOOT_READS`] reads, then read nothing of the image for [`QUIET`] (or
//! [`BOOT_MAX`] passed since the attach: a guest's kernel probes the disk
//! with a few reads, then may run a while before it mounts its root). Background
//! fill waits for it (or for the end of the boot a profile recorded, if
//! sooner), so a first boot has the link to itself and the store serves it
//! little more than its working set. An image no guest attaches to within
//! [`QUIET`] of its opening has no boot to wait for.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
// tokio's clock, so that tests can run on paused time.
use tokio::time::Instant;

/// A boot that reads nothing for this long is over.
pub const QUIET: Duration = Duration::from_secs(20);
/// Reads before a quiet time counts: more than a kernel's partition probe.
pub const BOOT_READS: u64 = 64;
/// A boot is over this long after the first attach, whatever it reads.
pub const BOOT_MAX: Duration = Duration::from_secs(120);

const UNSET: u64 = u64::MAX;

pub struct BootWatch {
    start: Instant,
    /// Microseconds from `start` to the first attach.
    attach_us: AtomicU64,
    /// Microseconds from `start` to the latest guest read (to the
    /// millisecond); meaningful once `reads` is not 0.
    read_us: AtomicU64,
    /// Reads so far, counted up to [`BOOT_READS`].
    reads: AtomicU64,
    attached: Notify,
    /// Said over by [`BootWatch::end`].
    ended: AtomicBool,
}

impl Default for BootWatch {
    fn default() -> Self {
        BootWatch {
            start: Instant::now(),
            attach_us: AtomicU64::new(UNSET),
            read_us: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            attached: Notify::new(),
            ended: AtomicBool::new(false),
        }
    }
}

impl BootWatch {
    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// A guest attached to a disk of the image (the first starts the boot).
    pub fn note_attach(&self) {
        let now = self.now_us();
        if self
            .attach_us
            .compare_exchange(UNSET, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.attached.notify_waiters();
        }
    }

    /// A guest read the image (the first read is an attach). Cheap enough
    /// for every read: a clock read and two loads, an add for the first
    /// [`BOOT_READS`] reads, a store at most once a millisecond.
    pub fn note_read(&self) {
        if self.reads.load(Ordering::Relaxed) < BOOT_READS && self.reads.fetch_add(1, Ordering::Relaxed) == 0 {
            // A read is an attach, whether or not one was reported.
            self.note_attach();
        }
        let now = self.now_us();
        if now >= self.read_us.load(Ordering::Relaxed) + 1000 {
            self.read_us.fetch_max(now, Ordering::Relaxed);
        }
    }

    /// Says the boot is over now (for tests of what follows a boot).
    #[cfg(test)]
    pub fn end(&self) {
        self.ended.store(true, Ordering::Relaxed);
        self.attached.notify_waiters();
    }

    /// Resolves once the first boot is over.
    pub async fn boot_over(&self) {
        let attach = loop {
            let attached = self.attached.notified();
            tokio::pin!(attached);
            attached.as_mut().enable();
            if self.ended.load(Ordering::Relaxed) {
                return;
            }
            match self.attach_us.load(Ordering::Relaxed) {
                UNSET if Instant::now() >= self.start + QUIET => return,
                UNSET => {
                    tokio::select! {
                        () = attached => {}
                        () = tokio::time::sleep_until(self.start + QUIET) => {}
                    }
                }
                us => break us,
            }
        };
        let at = |us: u64| self.start + Duration::from_micros(us);
        let cap = at(attach) + BOOT_MAX;
        loop {
            let over = match self.reads.load(Ordering::Relaxed) {
                n if n < BOOT_READS => cap,
                _ => (at(self.read_us.load(Ordering::Relaxed)) + QUIET).min(cap),
            };
            let now = Instant::now();
            if now >= over {
                return;
            }
            // Look again at least every second: the first read moves the end.
            tokio::time::sleep_until(over.min(now + Duration::from_secs(1))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Runs `boot_over` in the background; the time it resolved, if it has.
    fn watch(w: &Arc<BootWatch>) -> Arc<std::sync::Mutex<Option<Instant>>> {
        let done = Arc::new(std::sync::Mutex::new(None));
        let (w, d) = (w.clone(), done.clone());
        tokio::spawn(async move {
            w.boot_over().await;
            *d.lock().unwrap() = Some(Instant::now());
        });
        done
    }

    /// `n` guest reads at once.
    fn read(w: &BootWatch, n: u64) {
        for _ in 0..n {
            w.note_read();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_boot_is_over_once_the_guest_stops_reading_for_the_quiet_time() {
        let w = Arc::new(BootWatch::default());
        let done = watch(&w);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let attach = Instant::now();
        w.note_attach();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            read(&w, BOOT_READS);
        }
        let last = Instant::now();
        tokio::time::sleep(QUIET - Duration::from_secs(1)).await;
        assert!(done.lock().unwrap().is_none(), "over while the guest still read");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let t = done.lock().unwrap().expect("not over after a quiet time");
        assert!(t >= last + QUIET && t < attach + BOOT_MAX, "{:?}", t - attach);
    }

    #[tokio::test(start_paused = true)]
    async fn a_guest_kernel_that_reads_late_still_has_its_boot() {
        let w = Arc::new(BootWatch::default());
        let done = watch(&w);
        w.note_attach();
        // The kernel probes the disk, then runs a while before it reads
        // its root file system.
        read(&w, 8);
        tokio::time::sleep(QUIET * 3).await;
        assert!(done.lock().unwrap().is_none(), "over after the kernel's probe");
        read(&w, BOOT_READS);
        let first = Instant::now();
        tokio::time::sleep(QUIET + Duration::from_secs(2)).await;
        let t = done.lock().unwrap().expect("not over after a quiet time");
        assert!(t >= first + QUIET, "{:?}", t - first);
    }

    #[tokio::test(start_paused = true)]
    async fn an_image_no_guest_attaches_to_has_no_boot_to_wait_for() {
        let w = Arc::new(BootWatch::default());
        let opened = Instant::now();
        let done = watch(&w);
        tokio::time::sleep(QUIET + Duration::from_secs(1)).await;
        let t = done.lock().unwrap().expect("waited for a boot that never began");
        assert!(t >= opened + QUIET, "{:?}", t - opened);
    }

    #[tokio::test(start_paused = true)]
    async fn a_boot_that_keeps_reading_is_over_after_the_cap() {
        let w = Arc::new(BootWatch::default());
        let done = watch(&w);
        let attach = Instant::now();
        // A read counts as the attach.
        w.note_read();
        while Instant::now() < attach + BOOT_MAX + Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            w.note_read();
        }
        let t = done.lock().unwrap().expect("a boot that keeps reading never ended");
        assert!(t >= attach + BOOT_MAX && t <= attach + BOOT_MAX + Duration::from_secs(1));
    }
}
