//! The store pipelines: work for the store queues per store partition and is done one batch at
//! a time, so a round trip is paid per batch, not per item, and a slow partition does not hold
//! up the others. Two pipelines use it: commits (sequenced messages, group commit) and
//! conversation loads (the first message of many conversations at once, after a start).
//!
//! This module is the pipelines' state, without I/O: [`PartitionQueues`] says when a partition
//! needs a worker task and hands out its batches. The shard runtime runs one task per busy
//! partition and pipeline (it is the only place that calls the store); the simulator drives the
//! same commit queues against a fake store.

use std::collections::VecDeque;

use crate::{roles::Sequenced, store::LoadRequest};

struct Queue<T> {
    pending: VecDeque<T>,
    /// A worker task is working on this partition.
    busy: bool,
}

/// Items waiting for the store, per store partition.
pub struct PartitionQueues<T> {
    queues: Vec<Queue<T>>,
    batch_max: usize,
    backlog_max: usize,
}

/// Messages waiting for their commit.
pub type CommitQueues = PartitionQueues<Sequenced>;
/// Conversations waiting for their load.
pub type LoadQueues = PartitionQueues<LoadRequest>;

/// What [`PartitionQueues::push`] did with an item.
pub enum Queued<T> {
    /// Queued behind a working task.
    Waiting,
    /// Queued on an idle partition: start its task.
    Start,
    /// The partition's backlog is full (its store is stalled or slow): the item is handed
    /// back, to be refused at once.
    Full(T),
}

impl<T> PartitionQueues<T> {
    pub fn new(partitions: usize, batch_max: usize, backlog_max: usize) -> PartitionQueues<T> {
        assert!(partitions > 0 && batch_max > 0 && backlog_max > 0);
        let queues = (0..partitions).map(|_| Queue { pending: VecDeque::new(), busy: false }).collect();
        PartitionQueues { queues, batch_max, backlog_max }
    }

    pub fn partitions(&self) -> usize {
        self.queues.len()
    }

    /// Queue an item on `part`, unless `backlog_max` are waiting there already. A partition
    /// without a task needs one started; it then counts as busy until
    /// [`PartitionQueues::next_batch`] returns `None`.
    pub fn push(&mut self, part: usize, s: T) -> Queued<T> {
        let q = &mut self.queues[part];
        if q.pending.len() >= self.backlog_max {
            return Queued::Full(s);
        }
        q.pending.push_back(s);
        if std::mem::replace(&mut q.busy, true) {
            Queued::Waiting
        } else {
            Queued::Start
        }
    }

    /// Items waiting on `part`.
    pub fn pending(&self, part: usize) -> usize {
        self.queues[part].pending.len()
    }

    /// Whether `part` has a full batch waiting (a task need not wait for more).
    pub fn full(&self, part: usize) -> bool {
        self.pending(part) >= self.batch_max
    }

    /// The task of `part` takes its next batch, oldest first; `None` when nothing is left, and
    /// the partition is then idle.
    pub fn next_batch(&mut self, part: usize) -> Option<Vec<T>> {
        let q = &mut self.queues[part];
        debug_assert!(q.busy, "a batch taken without a task");
        let n = q.pending.len().min(self.batch_max);
        if n == 0 {
            q.busy = false;
            return None;
        }
        Some(q.pending.drain(..n).collect())
    }
}
