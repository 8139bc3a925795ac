//! Worker threads for blocking work: argon2 password hashing and verification, and store calls.
//! Shards submit a closure and await its result through a oneshot channel; the queue is bounded
//! (`limits.worker_queue_max`), and a full queue is reported as `Busy` rather than waited on.

use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Sender, TrySendError};
use futures_channel::oneshot;

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Clone)]
pub struct Workers {
    tx: Sender<Job>,
}

/// The worker pool is full or gone.
#[derive(Debug, thiserror::Error)]
#[error("worker pool busy")]
pub struct Busy;

impl Workers {
    /// Start `threads` workers with a queue of `queue_max` jobs. The threads end when every
    /// `Workers` handle is dropped.
    pub fn start(threads: usize, queue_max: usize) -> (Workers, Vec<JoinHandle<()>>) {
        let (tx, rx) = bounded::<Job>(queue_max);
        let handles = (0..threads.max(1))
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .spawn(move || {
                        while let Ok(job) = rx.recv() {
                            job();
                        }
                    })
                    .expect("spawn worker thread")
            })
            .collect();
        (Workers { tx }, handles)
    }

    /// Run `f` on a worker and wait for its result.
    pub async fn run<R, F>(&self, f: F) -> Result<R, Busy>
    where
        R: Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        let (rtx, rrx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = rtx.send(f());
        });
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => return Err(Busy),
        }
        rrx.await.map_err(|_| Busy)
    }
}
