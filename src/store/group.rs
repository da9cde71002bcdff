//! Group commit: concurrent write calls share one transaction (and one fsync). Whoever
//! finds no commit running commits everything queued (its own call and those that
//! arrived while the previous transaction was committing) and hands each call its own
//! outcome.
//!
//! Two kinds of caller share the queue. A blocking call ([`WriteQueue::submit`]) waits
//! on its own condition variable and may lead a commit itself, so a `Store` used as a
//! library needs no runtime and no thread. An async call ([`WriteQueue::enqueue`]) only
//! queues its writes and awaits a oneshot: the store's writer thread, started on the first
//! async call, commits for it. A leader of either kind hands the next commit to the head
//! of the queue, so neither kind starves the other; and 64 async writers cost one thread
//! hand-off per group, not one parked thread each.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde_json::value::RawValue;
use tokio::sync::oneshot;

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
    inner: Arc<QueueInner>,
}

#[derive(Default)]
struct QueueInner {
    state: Mutex<QueueState>,
    /// Wakes the writer thread: an async call is queued and no commit runs.
    work: Condvar,
}

/// How a queued call learns its outcome.
enum Waiter {
    /// A blocking caller, parked on its own condition variable (so a commit wakes exactly
    /// the calls it finished, and the next leader, not every waiter).
    Thread(Arc<Condvar>),
    /// An async caller.
    Task(oneshot::Sender<WriteOutcome>),
}

#[derive(Default)]
struct QueueState {
    next_ticket: u64,
    queued: Vec<Job>,
    waiters: HashMap<u64, Waiter>,
    /// Outcomes of blocking calls, until they wake and take them.
    done: HashMap<u64, WriteOutcome>,
    committing: bool,
    writer_started: bool,
    /// The store is gone: the writer thread ends.
    closed: bool,
}

impl QueueState {
    fn enqueue(&mut self, writes: Vec<PreparedWrite>, waiter: Waiter) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.queued.push((ticket, writes));
        self.waiters.insert(ticket, waiter);
        ticket
    }

    /// Hands a call its outcome: an async caller at once, a blocking one when it wakes.
    fn deliver(&mut self, ticket: u64, outcome: WriteOutcome) {
        if let Some(Waiter::Thread(wake)) = self.waiters.get(&ticket) {
            wake.notify_one();
            self.done.insert(ticket, outcome);
        } else if let Some(Waiter::Task(tx)) = self.waiters.remove(&ticket) {
            // An error means the caller stopped waiting (its future was dropped): the
            // write stands all the same.
            let _ = tx.send(outcome);
        }
    }

    /// Wakes whoever leads the next commit: the first queued call if it blocks, the
    /// writer thread if it is async.
    fn wake_next_leader(&self, work: &Condvar) {
        match self.queued.first().and_then(|j| self.waiters.get(&j.0)) {
            Some(Waiter::Thread(w)) => w.notify_one(),
            Some(Waiter::Task(_)) => work.notify_one(),
            None => {}
        }
    }
}

impl QueueInner {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Every update of the state is complete between statements: a panic elsewhere
        // cannot leave it torn.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits everything queued (the caller holds the lock and found no commit
    /// running), delivers each call's outcome and wakes the next leader. A panicking
    /// commit fails every call of its group; it is returned to be resumed by a blocking
    /// leader (the writer thread carries on).
    fn lead<'a>(
        &'a self,
        mut st: MutexGuard<'a, QueueState>,
        commit: &dyn Fn(Vec<Job>) -> Vec<(u64, WriteOutcome)>,
    ) -> (
        MutexGuard<'a, QueueState>,
        Option<Box<dyn std::any::Any + Send>>,
    ) {
        st.committing = true;
        let jobs = std::mem::take(&mut st.queued);
        let tickets: Vec<u64> = jobs.iter().map(|j| j.0).collect();
        drop(st);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| commit(jobs)));
        let mut st = self.lock();
        st.committing = false;
        let panicked = match outcome {
            Ok(results) => {
                for (t, outcome) in results {
                    st.deliver(t, outcome);
                }
                None
            }
            Err(panic) => {
                // The calls must not wait forever for a commit that died.
                for t in tickets {
                    let e = StorageError::GroupCommitFailed("the commit panicked".into());
                    st.deliver(t, Err(e.into()));
                }
                Some(panic)
            }
        };
        st.wake_next_leader(&self.work);
        (st, panicked)
    }
}

/// Should the writer thread ever die outside a commit (which is caught), the async calls
/// queued for it fail instead of waiting forever, and the next async call starts another.
struct WriterExit(Arc<QueueInner>);

impl Drop for WriterExit {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.writer_started = false;
        if !std::thread::panicking() {
            return;
        }
        st.committing = false;
        let queued = std::mem::take(&mut st.queued);
        for job in queued {
            if let Some(Waiter::Task(_)) = st.waiters.get(&job.0) {
                // Dropping the sender fails the call's future.
                st.waiters.remove(&job.0);
            } else {
                st.queued.push(job);
            }
        }
        st.wake_next_leader(&self.0.work);
    }
}

impl WriteQueue {
    /// Queues one call's writes and returns its outcome once the transaction that took
    /// them has committed (or failed), blocking meanwhile. `commit` runs a group: one
    /// outcome per job.
    pub(super) fn submit(
        &self,
        writes: Vec<PreparedWrite>,
        commit: impl Fn(Vec<Job>) -> Vec<(u64, WriteOutcome)>,
    ) -> WriteOutcome {
        let wake = Arc::new(Condvar::new());
        let mut st = self.inner.lock();
        let ticket = st.enqueue(writes, Waiter::Thread(wake.clone()));
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
            let (next, panicked) = self.inner.lead(st, &commit);
            st = next;
            if let Some(panic) = panicked {
                st.done.remove(&ticket);
                st.waiters.remove(&ticket);
                drop(st);
                std::panic::resume_unwind(panic);
            }
        }
    }

    /// Queues one async call's writes; its outcome arrives on the returned receiver once
    /// the writer thread (see [`WriteQueue::start_writer`]) or a blocking leader has
    /// committed them.
    pub(super) fn enqueue(&self, writes: Vec<PreparedWrite>) -> oneshot::Receiver<WriteOutcome> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.inner.lock();
        st.enqueue(writes, Waiter::Task(tx));
        if !st.committing {
            self.inner.work.notify_one();
        }
        rx
    }

    /// Starts the writer thread that commits for async callers, once; `commit` returns
    /// `None` when the store is gone. False if the thread could not be started.
    pub(super) fn start_writer(
        &self,
        commit: impl Fn(Vec<Job>) -> Option<Vec<(u64, WriteOutcome)>> + Send + 'static,
    ) -> bool {
        {
            let mut st = self.inner.lock();
            if st.writer_started {
                return true;
            }
            st.writer_started = true;
        }
        let inner = self.inner.clone();
        let spawned = std::thread::Builder::new()
            .name("jetsync-writer".into())
            .spawn(move || {
                let _exit = WriterExit(inner.clone());
                let commit = |jobs: Vec<Job>| {
                    let tickets: Vec<u64> = jobs.iter().map(|j| j.0).collect();
                    commit(jobs).unwrap_or_else(|| {
                        let e = || StorageError::GroupCommitFailed("the store is closed".into());
                        tickets.into_iter().map(|t| (t, Err(e().into()))).collect()
                    })
                };
                let mut st = inner.lock();
                loop {
                    if st.closed {
                        return;
                    }
                    if st.committing || st.queued.is_empty() {
                        st = inner.work.wait(st).unwrap_or_else(|p| p.into_inner());
                        continue;
                    }
                    st = inner.lead(st, &commit).0;
                }
            });
        if spawned.is_err() {
            self.inner.lock().writer_started = false;
        }
        spawned.is_ok()
    }

    /// Ends the writer thread (the store is being dropped).
    pub(super) fn close(&self) {
        self.inner.lock().closed = true;
        self.inner.work.notify_all();
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
            .map(|_| {
                let (queue, groups, barrier) = (queue.clone(), groups.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let commit = naming_commit(groups, None);
                    barrier.wait();
                    queue.submit(Vec::new(), |jobs| commit(jobs).unwrap())
                })
            })
            .collect();
        let tickets: Vec<u64> = handles
            .into_iter()
            .map(|h| ticket_of(h.join().unwrap()))
            .collect();
        assert_each_once_and_grouped(tickets, &groups);
    }

    /// A commit for the tests: each call's outcome names its ticket; `panic_on` makes the
    /// commit that takes that ticket panic.
    fn naming_commit(
        groups: Arc<Mutex<Vec<usize>>>,
        panic_on: Option<u64>,
    ) -> impl Fn(Vec<Job>) -> Option<Vec<(u64, WriteOutcome)>> + Send + 'static {
        move |jobs: Vec<Job>| {
            // Slow enough that the other calls queue up behind the first commit.
            std::thread::sleep(std::time::Duration::from_millis(20));
            if jobs.iter().any(|j| Some(j.0) == panic_on) {
                panic!("a commit that dies");
            }
            groups.lock().unwrap().push(jobs.len());
            Some(
                jobs.into_iter()
                    .map(|(t, _)| {
                        (
                            t,
                            Err(StorageError::GroupCommitFailed(t.to_string()).into()),
                        )
                    })
                    .collect(),
            )
        }
    }

    /// Every call got exactly its own outcome, and fewer commits than calls ran.
    fn assert_each_once_and_grouped(mut tickets: Vec<u64>, groups: &Mutex<Vec<usize>>) {
        let calls = tickets.len();
        tickets.sort();
        assert_eq!(
            tickets,
            (0..calls as u64).collect::<Vec<_>>(),
            "each call got its own outcome"
        );
        let groups = groups.lock().unwrap();
        assert_eq!(groups.iter().sum::<usize>(), calls);
        assert!(groups.len() < calls, "calls were grouped: {groups:?}");
    }

    fn ticket_of(outcome: WriteOutcome) -> u64 {
        let Err(WriteError::Storage(StorageError::GroupCommitFailed(t))) = outcome else {
            panic!("unexpected outcome");
        };
        t.parse().unwrap()
    }

    /// Async calls are committed by the writer thread, several per commit, each getting
    /// its own outcome; blocking calls queued meanwhile share those commits.
    #[test]
    fn the_writer_thread_commits_async_calls_together_with_blocking_ones() {
        let queue = Arc::new(WriteQueue::default());
        let groups = Arc::new(Mutex::new(Vec::new()));
        assert!(queue.start_writer(naming_commit(groups.clone(), None)));
        let receivers: Vec<_> = (0..8).map(|_| queue.enqueue(Vec::new())).collect();
        let blocking = {
            let (queue, groups) = (queue.clone(), groups.clone());
            std::thread::spawn(move || {
                let commit = naming_commit(groups, None);
                queue.submit(Vec::new(), |jobs| commit(jobs).unwrap())
            })
        };
        let mut tickets: Vec<u64> = receivers
            .into_iter()
            .map(|rx| ticket_of(rx.blocking_recv().expect("the writer answered")))
            .collect();
        tickets.push(ticket_of(blocking.join().unwrap()));
        assert_each_once_and_grouped(tickets, &groups);
        queue.close();
    }

    /// A commit that panics fails every async call it took; the writer thread goes on and
    /// commits the next ones.
    #[test]
    fn a_panicking_commit_fails_its_async_calls_and_the_writer_goes_on() {
        let queue = WriteQueue::default();
        let groups = Arc::new(Mutex::new(Vec::new()));
        assert!(queue.start_writer(naming_commit(groups, Some(0))));
        let doomed = queue.enqueue(Vec::new());
        let Err(WriteError::Storage(StorageError::GroupCommitFailed(why))) =
            doomed.blocking_recv().expect("the writer answered")
        else {
            panic!("a failed commit is an error");
        };
        assert!(why.contains("panicked"), "{why}");
        let later = queue.enqueue(Vec::new());
        assert_eq!(
            ticket_of(later.blocking_recv().expect("the writer answered")),
            1
        );
        queue.close();
    }
}
