//! [`Notify`]: wakes the one task of a shard that waits on it (the sender's flusher, the
//! journal's committer, the shard's acknowledgement task). Single-threaded, no allocation: a
//! flag and one stored waker.

use std::cell::Cell;
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// A one-consumer wake-up. Notifications before the wait are kept (one flag, so many count
/// as one); the waiter is woken at most once per notification it has not yet seen.
#[derive(Default)]
pub struct Notify {
    pending: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Notify {
    /// Marks work pending and wakes the waiter, if it is not already due to run.
    pub fn notify(&self) {
        if !self.pending.replace(true) {
            if let Some(waker) = self.waker.take() {
                waker.wake();
            }
        }
    }

    /// Resolves once something was notified since the last wait returned.
    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.pending.replace(false) {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
    }
}
