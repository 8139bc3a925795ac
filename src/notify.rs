//! [`LocalNotify`]: a single-threaded notification with any number of waiters.
//!
//! A waiter checks its condition, then waits; `notify` wakes every waiter registered since, and a
//! wait that was created before a `notify` is ready even if it is first polled after it (the
//! notify bumps a generation the wait compares against). A notify with no wait outstanding is
//! not stored: every waiter re-checks its condition before waiting, so none is needed, and a
//! stored flag would let one waiter consume a wake-up meant for another (a History reply and a
//! catch-up both pacing on one session's writer hung that way).
//!
//! Why not a crate's `Notify`: these live on one shard's thread and are notified for every
//! queued frame; the thread-safe ones cost an atomic read-modify-write per notify.

use std::{
    cell::{Cell, RefCell},
    future::Future,
    pin::Pin,
    task::{Context, Poll, Waker},
};

#[derive(Default)]
pub struct LocalNotify {
    generation: Cell<u64>,
    /// The usual single waiter, inline (no allocation per idle connection).
    first: RefCell<Option<Waker>>,
    /// Further waiters. At most one waker per task: a task that waits again keeps its slot.
    rest: RefCell<Vec<Waker>>,
}

impl LocalNotify {
    /// Wake every current waiter.
    pub fn notify(&self) {
        self.generation.set(self.generation.get().wrapping_add(1));
        let first = self.first.borrow_mut().take();
        let rest = std::mem::take(&mut *self.rest.borrow_mut());
        if let Some(w) = first {
            w.wake();
        }
        for w in rest {
            w.wake();
        }
    }

    /// Ready after the next `notify`.
    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        NotifyWait { notify: self, generation: self.generation.get() }
    }

    /// Tasks waiting.
    pub fn waiters(&self) -> usize {
        usize::from(self.first.borrow().is_some()) + self.rest.borrow().len()
    }
}

struct NotifyWait<'a> {
    notify: &'a LocalNotify,
    generation: u64,
}

impl Future for NotifyWait<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.notify.generation.get() != self.generation {
            return Poll::Ready(());
        }
        let mut first = self.notify.first.borrow_mut();
        match first.as_ref() {
            None => *first = Some(cx.waker().clone()),
            Some(w) if w.will_wake(cx.waker()) => {}
            Some(_) => {
                let mut rest = self.notify.rest.borrow_mut();
                if !rest.iter().any(|w| w.will_wake(cx.waker())) {
                    rest.push(cx.waker().clone());
                }
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
        task::Wake,
    };

    use super::*;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Two waiters on one notify are both woken and both ready: neither consumes the other's
    /// wake-up; a task waiting repeatedly holds one slot.
    #[test]
    fn wakes_every_waiter() {
        let n = LocalNotify::default();
        let (ca, cb) = (Arc::new(Count(AtomicUsize::new(0))), Arc::new(Count(AtomicUsize::new(0))));
        let (wa, wb) = (Waker::from(ca.clone()), Waker::from(cb.clone()));
        let mut a = Box::pin(n.wait());
        let mut b = Box::pin(n.wait());
        assert!(a.as_mut().poll(&mut Context::from_waker(&wa)).is_pending());
        assert!(a.as_mut().poll(&mut Context::from_waker(&wa)).is_pending());
        assert!(b.as_mut().poll(&mut Context::from_waker(&wb)).is_pending());
        assert_eq!(n.waiters(), 2);
        n.notify();
        assert_eq!((ca.0.load(Ordering::Relaxed), cb.0.load(Ordering::Relaxed)), (1, 1));
        assert!(a.as_mut().poll(&mut Context::from_waker(&wa)).is_ready());
        assert!(b.as_mut().poll(&mut Context::from_waker(&wb)).is_ready());
        // A wait created before a notify and polled after it is ready.
        let mut c = Box::pin(n.wait());
        n.notify();
        assert!(c.as_mut().poll(&mut Context::from_waker(&wa)).is_ready());
    }
}
