//! Worker threads for blocking work: argon2 password hashing and verification, and store calls.
//! Shards submit a closure and await its result through a oneshot channel; the queue is bounded
//! (`limits.worker_queue_max`), and a full queue is reported as `Busy` rather than waited on.

use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Sender, TrySendError};
use futures_channel::oneshot;

/// `None` tells one worker thread to end.
type Job = Option<Box<dyn FnOnce() + Send + 'static>>;

#[derive(Clone)]
pub struct Workers {
    tx: Sender<Job>,
    threads: usize,
}

/// The worker pool is full or gone.
#[derive(Debug, thiserror::Error)]
#[error("worker pool busy")]
pub struct Busy;

impl Workers {
    /// Start `threads` workers with a queue of `queue_max` jobs. The threads end after
    /// [`Workers::stop`] (or when every handle is dropped).
    pub fn start(threads: usize, queue_max: usize) -> (Workers, Vec<JoinHandle<()>>) {
        let (tx, rx) = bounded::<Job>(queue_max);
        let threads = threads.max(1);
        let handles = (0..threads)
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .spawn(move || {
                        while let Ok(Some(job)) = rx.recv() {
                            job();
                        }
                    })
                    .expect("spawn worker thread")
            })
            .collect();
        (Workers { tx, threads }, handles)
    }

    /// Run `f` on a worker and wait for its result.
    pub async fn run<R, F>(&self, f: F) -> Result<R, Busy>
    where
        R: Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        let (rtx, rrx) = oneshot::channel();
        let job: Job = Some(Box::new(move || {
            let _ = rtx.send(f());
        }));
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => return Err(Busy),
        }
        rrx.await.map_err(|_| Busy)
    }
}

impl Workers {
    /// Let every worker thread finish the jobs queued before this call, then end.
    pub fn stop(&self) {
        for _ in 0..self.threads {
            let _ = self.tx.send(None);
        }
    }
}
