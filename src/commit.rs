//! The commit pipeline: sequenced messages queue per store partition and are committed one
//! batch at a time (group commit), so durability costs a round trip per batch, not per message,
//! and a slow partition does not hold up the others.
//!
//! This module is the pipeline's state, without I/O: [`CommitQueues`] says when a partition
//! needs a committer and hands out its batches. The shard runtime runs one committer task per
//! busy partition (it is the only place that calls the store); the simulator drives the same
//! queues against a fake store.

use std::collections::VecDeque;

use crate::roles::Sequenced;

#[derive(Default)]
struct Queue {
    pending: VecDeque<Sequenced>,
    /// A committer is working on this partition.
    busy: bool,
}

/// Messages waiting for their commit, per store partition.
pub struct CommitQueues {
    queues: Vec<Queue>,
    batch_max: usize,
    backlog_max: usize,
}

/// What [`CommitQueues::push`] did with a message.
pub enum Queued {
    /// Queued behind a working committer.
    Waiting,
    /// Queued on an idle partition: start its committer.
    StartCommitter,
    /// The partition's backlog is full (its store is stalled or slow): the message is handed
    /// back, to be refused at once.
    Full(Sequenced),
}

impl CommitQueues {
    pub fn new(partitions: usize, batch_max: usize, backlog_max: usize) -> CommitQueues {
        assert!(partitions > 0 && batch_max > 0 && backlog_max > 0);
        CommitQueues { queues: (0..partitions).map(|_| Queue::default()).collect(), batch_max, backlog_max }
    }

    pub fn partitions(&self) -> usize {
        self.queues.len()
    }

    /// Queue a message on `part`, unless `backlog_max` are waiting there already. A partition
    /// without a committer needs one started; it then counts as busy until
    /// [`CommitQueues::next_batch`] returns `None`.
    pub fn push(&mut self, part: usize, s: Sequenced) -> Queued {
        let q = &mut self.queues[part];
        if q.pending.len() >= self.backlog_max {
            return Queued::Full(s);
        }
        q.pending.push_back(s);
        if std::mem::replace(&mut q.busy, true) {
            Queued::Waiting
        } else {
            Queued::StartCommitter
        }
    }

    /// Messages waiting on `part`.
    pub fn pending(&self, part: usize) -> usize {
        self.queues[part].pending.len()
    }

    /// Whether `part` has a full batch waiting (a committer need not wait for more).
    pub fn full(&self, part: usize) -> bool {
        self.pending(part) >= self.batch_max
    }

    /// The committer of `part` takes its next batch, oldest first; `None` when nothing is left,
    /// and the partition is then idle.
    pub fn next_batch(&mut self, part: usize) -> Option<Vec<Sequenced>> {
        let q = &mut self.queues[part];
        debug_assert!(q.busy, "a batch taken without a committer");
        let n = q.pending.len().min(self.batch_max);
        if n == 0 {
            q.busy = false;
            return None;
        }
        Some(q.pending.drain(..n).collect())
    }
}
