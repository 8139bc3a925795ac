//! Thread pools for blocking work, so that a shard never blocks: [`Workers::hash`] hashes and
//! verifies passwords (argon2id: CPU-bound, tens of milliseconds a job) and [`Workers::store`]
//! runs store calls (account lookups and writes, conversation loads, history, catch-up, cursor
//! saves: mostly waiting on a database). Two pools, so that neither kind of job queues behind
//! the other: a burst of logins does not delay history pages, and a slow database does not
//! delay password checks.
//!
//! A shard submits a closure and awaits its result through a oneshot channel. Each pool's queue
//! is bounded (`limits.worker_queue_max`), and a full queue is reported as [`JobError::Busy`]
//! rather than waited on. A job that panics is caught: its caller gets [`JobError::Panicked`],
//! the panic is logged, and the thread goes on with the next job.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    thread::JoinHandle,
};

use crossbeam_channel::{bounded, Sender, TrySendError};
use futures_channel::oneshot;

use crate::protocol::ErrorCode;

/// `None` tells one worker thread to end.
type Job = Option<Box<dyn FnOnce() + Send + 'static>>;

/// Why a job gave no result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// The pool's queue is full, or the pool has stopped.
    #[error("worker pool busy")]
    Busy,
    /// The job panicked (logged); its thread lives on.
    #[error("worker job panicked")]
    Panicked,
}

impl JobError {
    /// The error code a client gets: Busy for a full queue, `failed` (the request's own failure
    /// code) for a panicked job.
    pub fn code_or(self, failed: ErrorCode) -> ErrorCode {
        match self {
            JobError::Busy => ErrorCode::Busy,
            JobError::Panicked => failed,
        }
    }
}

/// One bounded pool of threads.
#[derive(Clone)]
pub struct Pool {
    tx: Sender<Job>,
    threads: usize,
    name: &'static str,
}

/// The pools every shard shares.
#[derive(Clone)]
pub struct Workers {
    /// Password hashing and verification (`server.worker_threads`).
    pub hash: Pool,
    /// Store calls (`server.store_threads`).
    pub store: Pool,
    /// Conversation loads: the send path's store reads, apart from the bulk reads (history,
    /// catch-up) so that a first message never waits behind a burst of logins. One thread per
    /// shard and store partition: a shard runs at most one load batch per partition at a time.
    pub load: Pool,
}

impl Workers {
    /// Start `hash_threads` hashing threads, `store_threads` store threads and `load_threads`
    /// load threads, each pool with a queue of `queue_max` jobs. The threads end after
    /// [`Workers::stop`].
    pub fn start(
        hash_threads: usize,
        store_threads: usize,
        load_threads: usize,
        queue_max: usize,
    ) -> (Workers, Vec<JoinHandle<()>>) {
        let (hash, mut handles) = Pool::start("hash", hash_threads, queue_max);
        let (store, more) = Pool::start("store", store_threads, queue_max);
        handles.extend(more);
        let (load, more) = Pool::start("load", load_threads, queue_max);
        handles.extend(more);
        (Workers { hash, store, load }, handles)
    }

    /// Let every thread finish the jobs queued before this call, then end.
    pub fn stop(&self) {
        self.hash.stop();
        self.store.stop();
        self.load.stop();
    }
}

impl Pool {
    /// Start `threads` threads (at least one) named `{name}-{i}` with a queue of `queue_max`
    /// jobs. The threads end after [`Pool::stop`] (or when every handle is dropped).
    pub fn start(name: &'static str, threads: usize, queue_max: usize) -> (Pool, Vec<JoinHandle<()>>) {
        let (tx, rx) = bounded::<Job>(queue_max);
        let threads = threads.max(1);
        let handles = (0..threads)
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || {
                        while let Ok(Some(job)) = rx.recv() {
                            job();
                        }
                    })
                    .expect("spawn worker thread")
            })
            .collect();
        (Pool { tx, threads, name }, handles)
    }

    /// Run `f` on one of the pool's threads and wait for its result.
    pub async fn run<R, F>(&self, f: F) -> Result<R, JobError>
    where
        R: Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        let (rtx, rrx) = oneshot::channel();
        let name = self.name;
        let job: Job = Some(Box::new(move || {
            // The job owns everything it touches and its result goes nowhere after a panic, so
            // no broken state is observed after unwinding.
            let outcome = catch_unwind(AssertUnwindSafe(f)).map_err(|panic| {
                let msg = panic
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("(no message)");
                log::error!("{name} worker: a job panicked: {msg}");
                JobError::Panicked
            });
            let _ = rtx.send(outcome);
        }));
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => return Err(JobError::Busy),
        }
        rrx.await.map_err(|_| JobError::Busy)?
    }

    /// Let every thread finish the jobs queued before this call, then end.
    pub fn stop(&self) {
        for _ in 0..self.threads {
            let _ = self.tx.send(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    /// A panicking job answers Panicked, and the pool's only thread goes on serving jobs.
    #[test]
    fn panicking_job_keeps_its_thread() {
        let (pool, handles) = Pool::start("test", 1, 4);
        let thread_of = || std::thread::current().id();
        let before = block_on(pool.run(thread_of)).unwrap();
        assert_eq!(block_on(pool.run(|| -> u32 { panic!("boom") })), Err(JobError::Panicked));
        assert_eq!(block_on(pool.run(|| 7)), Ok(7));
        assert_eq!(block_on(pool.run(thread_of)).unwrap(), before, "the same thread serves on");
        pool.stop();
        for h in handles {
            h.join().unwrap();
        }
    }

    /// A full queue answers Busy at once; the two pools do not share a queue.
    #[test]
    fn full_queue_is_busy_and_pools_are_separate() {
        let (workers, handles) = Workers::start(1, 1, 1, 1);
        let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(0);
        let (started_tx, started_rx) = crossbeam_channel::bounded::<()>(1);
        // Hold the store pool's only thread, then fill its one-slot queue.
        let store = workers.store.clone();
        let held = std::thread::spawn(move || {
            block_on(store.run(move || {
                started_tx.send(()).unwrap();
                release_rx.recv().unwrap();
            }))
        });
        started_rx.recv().unwrap();
        let store = workers.store.clone();
        let queued = std::thread::spawn(move || block_on(store.run(|| 1)));
        while workers.store.tx.is_empty() {
            std::thread::yield_now();
        }
        assert_eq!(block_on(workers.store.run(|| 2)), Err(JobError::Busy));
        // The hash pool still answers while the store pool is stuck.
        assert_eq!(block_on(workers.hash.run(|| 3)), Ok(3));
        release_tx.send(()).unwrap();
        assert_eq!(held.join().unwrap(), Ok(()));
        assert_eq!(queued.join().unwrap(), Ok(1));
        workers.stop();
        for h in handles {
            h.join().unwrap();
        }
    }
}
