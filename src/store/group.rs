//! Group commit: concurrent write calls share one transaction (and one fsync). A caller
//! that finds no commit running commits everything queued (its own call and those that
//! arrived while the previous transaction was committing) and hands each call its own
//! outcome; callers whose call was taken wait for theirs. No thread of its own, so a
//! `Store` used as a library needs no runtime.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde_json::value::RawValue;

use super::{Change, Write, Written};
use crate::error::{StorageError, WriteError};

/// One write with its document already serialised and checked.
pub(super) type PreparedWrite = (Write, Option<Box<RawValue>>);
/// What one write call gets back.
pub(super) type WriteOutcome = Result<(Vec<Written>, Vec<Change>), WriteError>;
/// One write call waiting for a group transaction: its ticket and its writes.
pub(super) type Job = (u64, Vec<PreparedWrite>);

/// Write calls waiting for, or being committed by, a group transaction.
#[derive(Default)]
pub(super) struct WriteQueue {
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    next_ticket: u64,
    queued: Vec<Job>,
    /// Each waiting call's own wake-up, so a commit wakes exactly the calls it finished
    /// (and the next leader), not every waiter.
    waiters: HashMap<u64, Arc<Condvar>>,
    done: HashMap<u64, WriteOutcome>,
    committing: bool,
}

impl QueueState {
    /// Wakes the first queued call, which leads the next commit.
    fn wake_next_leader(&self) {
        if let Some(w) = self.queued.first().and_then(|j| self.waiters.get(&j.0)) {
            w.notify_one();
        }
    }
}

impl WriteQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Every update of the state is complete between statements: a panic elsewhere
        // cannot leave it torn.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues one call's writes and returns its outcome once the transaction that took
    /// them has committed (or failed). `commit` runs a group: one outcome per job.
    pub(super) fn submit(
        &self,
        writes: Vec<PreparedWrite>,
        commit: impl Fn(Vec<Job>) -> Vec<(u64, WriteOutcome)>,
    ) -> WriteOutcome {
        let wake = Arc::new(Condvar::new());
        let mut st = self.lock();
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.queued.push((ticket, writes));
        st.waiters.insert(ticket, wake.clone());
        loop {
            if let Some(outcome) = st.done.remove(&ticket) {
                st.waiters.remove(&ticket);
                return outcome;
            }
            if st.committing {
                st = wake.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // No commit running and ours not done: ours is queued; commit the queue.
            st.committing = true;
            let jobs = std::mem::take(&mut st.queued);
            let tickets: Vec<u64> = jobs.iter().map(|j| j.0).collect();
            drop(st);
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| commit(jobs)));
            st = self.lock();
            st.committing = false;
            let results = match outcome {
                Ok(results) => results,
                Err(panic) => {
                    // The other calls must not wait forever for a commit that died.
                    for t in tickets.into_iter().filter(|t| *t != ticket) {
                        let e = StorageError::GroupCommitFailed("the commit panicked".into());
                        st.done.insert(t, Err(e.into()));
                        if let Some(w) = st.waiters.get(&t) {
                            w.notify_one();
                        }
                    }
                    st.waiters.remove(&ticket);
                    st.wake_next_leader();
                    drop(st);
                    std::panic::resume_unwind(panic);
                }
            };
            for (t, outcome) in results {
                if let Some(w) = st.waiters.get(&t) {
                    w.notify_one();
                }
                st.done.insert(t, outcome);
            }
            st.wake_next_leader();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;

    use super::*;

    /// Calls that arrive while a commit runs are committed together by the next one, and
    /// every call gets exactly its own outcome.
    #[test]
    fn waiting_calls_share_the_next_commit() {
        let queue = Arc::new(WriteQueue::default());
        let groups = Arc::new(Mutex::new(Vec::new()));
        let barrier = Arc::new(Barrier::new(8));
        let handles: Vec<_> = (0..8u64)
            .map(|i| {
                let (queue, groups, barrier) = (queue.clone(), groups.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let outcome = queue.submit(Vec::new(), |jobs| {
                        // Slow enough that the others queue up behind the first commit.
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        groups.lock().unwrap().push(jobs.len());
                        jobs.into_iter()
                            .map(|(t, _)| {
                                let err = StorageError::GroupCommitFailed(t.to_string());
                                (t, Err(err.into()))
                            })
                            .collect()
                    });
                    (i, outcome)
                })
            })
            .collect();
        let mut tickets = Vec::new();
        for h in handles {
            let (_, outcome) = h.join().unwrap();
            let Err(WriteError::Storage(StorageError::GroupCommitFailed(t))) = outcome else {
                panic!("unexpected outcome");
            };
            tickets.push(t.parse::<u64>().unwrap());
        }
        tickets.sort();
        assert_eq!(
            tickets,
            (0..8).collect::<Vec<_>>(),
            "each call got its own outcome"
        );
        let groups = groups.lock().unwrap();
        assert_eq!(groups.iter().sum::<usize>(), 8);
        assert!(groups.len() < 8, "calls were grouped: {groups:?}");
    }
}
