//! The mirror's own OS thread: every blocking piece of a mirror's work (the store's
//! change-log and record reads, SQLite's transactions) runs on it, one job at a time, at
//! a lower CPU priority than the node's other threads.
//!
//! Why a thread of its own and not tokio's blocking pool: the priority is a property of
//! the thread (Linux keeps the nice value per thread), and the pool's threads also run
//! the node's apply and writes. On a machine with fewer cores than busy threads (a node
//! catching up: the apply, the NATS client and nats-server all want the CPU) the mirror
//! then takes what the node leaves idle instead of a fair share of it: the node's
//! replication goes first, the mirror trails further while the machine is saturated and
//! catches up once it is not (it is never starved: a niced thread still gets a small
//! share under contention).

use std::sync::mpsc;

use super::MirrorError;

/// How much lower than the node's own the mirror thread's priority is (nice steps, Linux;
/// 10 gives it about a tenth of a competing node thread's CPU share when the cores are
/// saturated, all it wants when they are not).
pub const NICE: i32 = 10;

type Job = Box<dyn FnOnce() + Send>;

/// A thread that runs jobs one after another (see the module docs).
pub(crate) struct Worker {
    jobs: mpsc::Sender<Job>,
}

impl Worker {
    /// Starts the thread `mirror-<name>`, `nice` steps below the process's priority
    /// (0: the same). It ends once the `Worker` is dropped and its queue is done.
    pub(crate) fn start(name: &str, nice: i32) -> Result<Worker, MirrorError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(format!("mirror-{name}"))
            .spawn(move || {
                if nice > 0 {
                    lower_priority(nice);
                }
                while let Ok(job) = queue.recv() {
                    // A job that panics drops its reply channel (its caller gets an
                    // error); the thread goes on with the next.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .map_err(|e| MirrorError::Task(format!("cannot start the mirror thread: {e}")))?;
        Ok(Worker { jobs })
    }

    /// Runs `f` on the thread and waits for its result without blocking the runtime.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, MirrorError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| MirrorError::Task("the mirror thread is gone".into()))?;
        rx.await
            .map_err(|_| MirrorError::Task("a mirror job panicked".into()))
    }
}

/// Lowers the calling thread's CPU priority by `nice` steps. Best effort: a failure only
/// leaves the mirror at the node's priority, so it is logged, not an error.
#[cfg(target_os = "linux")]
fn lower_priority(nice: i32) {
    use rustix::process::{getpriority_process, setpriority_process};
    // On Linux `PRIO_PROCESS` of pid 0 (`None`) is the calling thread (the nice value is
    // per thread under NPTL), not the whole process.
    let r =
        getpriority_process(None).and_then(|now| setpriority_process(None, (now + nice).min(19)));
    if let Err(e) = r {
        tracing::warn!(error = %e, "could not lower the SQL mirror thread's priority; it runs at the node's");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority(_nice: i32) {
    // Elsewhere the nice value is per process: the mirror runs at the node's priority.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_in_order_on_a_lower_priority_thread_and_a_panic_is_an_error() {
        let w = Worker::start("t", NICE).unwrap();
        let name = w
            .run(|| std::thread::current().name().map(str::to_owned))
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("mirror-t"));
        #[cfg(target_os = "linux")]
        {
            use rustix::process::getpriority_process;
            let mine = getpriority_process(None).unwrap();
            let its = w.run(|| getpriority_process(None)).await.unwrap().unwrap();
            assert_eq!(its, (mine + NICE).min(19), "the mirror thread's nice value");
        }
        let r = w.run(|| -> u32 { panic!("boom") }).await;
        assert!(matches!(r, Err(MirrorError::Task(_))), "{r:?}");
        assert_eq!(
            w.run(|| 7).await.unwrap(),
            7,
            "the thread goes on after a panic"
        );
    }
}
