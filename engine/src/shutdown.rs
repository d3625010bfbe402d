//! Shutdown as a type (mini-redis's `shutdown.rs`): a one-shot latch every task of a shard can
//! wait on, and the engine-wide trigger that sets it on every shard.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// A one-shot, single-threaded latch: once set it stays set and wakes every waiter.
#[derive(Default)]
pub struct Latch {
    set: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
}

impl Latch {
    /// Sets the latch and wakes every waiter.
    pub fn trigger(&self) {
        self.set.set(true);
        for waker in self.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    /// True once triggered.
    pub fn is_set(&self) -> bool {
        self.set.get()
    }

    /// Resolves when the latch is set.
    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.set.get() {
                Poll::Ready(())
            } else {
                self.waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
    }
}
