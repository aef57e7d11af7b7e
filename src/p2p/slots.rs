//! Upload slots with priority: a freed slot goes to the oldest waiter of
//! the highest class, so a peer's demand request overtakes the profile and
//! background uploads queued before it. The number of waiters is bounded.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::fetch::Class;

/// Waiters beyond this are refused at once (the requester asks elsewhere).
/// Each holds its chunk's bytes: 16 MiB at the default chunk size.
pub const MAX_WAITING: usize = 64;

pub struct UploadSlots {
    #[cfg(test)]
    total: usize,
    state: Mutex<State>,
}

struct State {
    free: usize,
    /// Per class, waiters in arrival order; a slot is handed over as a guard.
    waiting: [VecDeque<oneshot::Sender<SlotGuard>>; 3],
}

/// A slot, given back when dropped.
pub struct SlotGuard {
    /// None once disarmed (a guard that was never delivered).
    slots: Option<Arc<UploadSlots>>,
}

/// Too many uploads are waiting.
#[derive(Debug)]
pub struct Full;

impl UploadSlots {
    pub fn new(total: usize) -> Arc<UploadSlots> {
        let total = total.max(1);
        Arc::new(UploadSlots {
            #[cfg(test)]
            total,
            state: Mutex::new(State {
                free: total,
                waiting: Default::default(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot, when one is free and no waiter of a higher class is before us.
    pub async fn acquire(self: &Arc<Self>, class: Class) -> Result<SlotGuard, Full> {
        let rx = {
            let mut s = self.lock();
            if s.free > 0 {
                // Slots are handed to waiters as they free: none wait now.
                s.free -= 1;
                return Ok(SlotGuard {
                    slots: Some(self.clone()),
                });
            }
            s.waiting.iter_mut().for_each(|q| q.retain(|tx| !tx.is_closed()));
            if s.waiting.iter().map(VecDeque::len).sum::<usize>() >= MAX_WAITING {
                return Err(Full);
            }
            let (tx, rx) = oneshot::channel();
            s.waiting[class as usize].push_back(tx);
            rx
        };
        // The sender is only dropped with the slots, which we hold an Arc to.
        rx.await.map_err(|_| Full)
    }

    /// Uploads holding a slot plus those waiting for one.
    #[cfg(test)]
    pub fn depth(&self) -> usize {
        let s = self.lock();
        self.total - s.free
            + s.waiting
                .iter()
                .map(|q| q.iter().filter(|tx| !tx.is_closed()).count())
                .sum::<usize>()
    }

    fn release(self: &Arc<Self>) {
        let mut s = self.lock();
        for class in Class::ALL.into_iter().rev() {
            while let Some(tx) = s.waiting[class as usize].pop_front() {
                // A waiter that gives up after this drops the guard, which
                // releases the slot again (from its own task, not under this lock).
                let guard = SlotGuard {
                    slots: Some(self.clone()),
                };
                match tx.send(guard) {
                    Ok(()) => return,
                    // Not delivered: disarm it, the slot is still ours to give.
                    Err(mut guard) => guard.slots = None,
                }
            }
        }
        s.free += 1;
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Some(slots) = self.slots.take() {
            slots.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_freed_slot_goes_to_the_highest_class_waiting() {
        let slots = UploadSlots::new(1);
        let held = slots.acquire(Class::Background).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for class in [Class::Background, Class::Profile, Class::Demand, Class::Background] {
            let (slots, order) = (slots.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _g = slots.acquire(class).await.unwrap();
                order.lock().unwrap().push(class);
                tokio::task::yield_now().await;
            }));
            // Queue in this order.
            tokio::task::yield_now().await;
        }
        assert_eq!(slots.depth(), 5);
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            [Class::Demand, Class::Profile, Class::Background, Class::Background]
        );
        assert_eq!(slots.depth(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_waiter_that_gives_up_loses_no_slot() {
        let slots = UploadSlots::new(1);
        let held = slots.acquire(Class::Demand).await.unwrap();
        let r = tokio::time::timeout(Duration::from_millis(20), slots.acquire(Class::Demand)).await;
        assert!(r.is_err(), "got a slot that was held");
        drop(held);
        // The abandoned waiter did not keep the slot.
        let again = tokio::time::timeout(Duration::from_secs(1), slots.acquire(Class::Background)).await;
        assert!(again.is_ok(), "the slot was lost");
        assert_eq!(slots.depth(), 1);
    }
}
