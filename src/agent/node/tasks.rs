//! The node's background tasks: tracked together, waited for at the stop,
//! and ended together when they outlast it.

use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The tasks a node starts on its own (outgoing migrations, operations,
/// record edits that wait for etcd) and the token that ends them.
#[derive(Debug, Default)]
pub(crate) struct Tasks {
    tracker: TaskTracker,
    halt: CancellationToken,
}

impl Tasks {
    /// Runs `task` in the background, tracked: [`Tasks::end`] waits for
    /// it, then ends it if it outlasts the wait.
    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: Future + Send + 'static,
        F::Output: Send,
    {
        let halt = self.halt.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = halt.cancelled() => {}
                _ = task => {}
            }
        });
    }

    /// How many are still running.
    pub(crate) fn len(&self) -> usize {
        self.tracker.len()
    }

    /// Waits up to `patience` for the tasks to end (a record edit lands
    /// once etcd answers), then ends those still running and says how
    /// many. Tasks started meanwhile are waited for too.
    pub(crate) async fn end(&self, patience: Duration) {
        self.tracker.close();
        if tokio::time::timeout(patience, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.len(),
                "background tasks still running at the stop: ending them"
            );
            self.halt.cancel();
            self.tracker.wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn the_stop_waits_for_a_task_that_ends_in_time() {
        let tasks = Tasks::default();
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            d.store(true, Ordering::SeqCst);
        });
        tasks.end(Duration::from_secs(10)).await;
        assert!(done.load(Ordering::SeqCst));
        assert_eq!(tasks.len(), 0);
    }

    #[tokio::test]
    async fn a_task_that_outlasts_the_wait_is_ended() {
        let tasks = Tasks::default();
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        tasks.spawn(async move {
            std::future::pending::<()>().await;
            d.store(true, Ordering::SeqCst);
        });
        assert_eq!(tasks.len(), 1);
        // Without the halt this would wait forever: bound it, to fail.
        tokio::time::timeout(Duration::from_secs(5), tasks.end(Duration::from_millis(50)))
            .await
            .expect("a task outlasting the wait is ended");
        assert!(!done.load(Ordering::SeqCst));
        assert_eq!(tasks.len(), 0);
    }

    #[tokio::test]
    async fn a_task_started_during_the_wait_is_waited_for() {
        let tasks = Arc::new(Tasks::default());
        let done = Arc::new(AtomicBool::new(false));
        let (t, d) = (tasks.clone(), done.clone());
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            t.spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                d.store(true, Ordering::SeqCst);
            });
        });
        tasks.end(Duration::from_secs(10)).await;
        assert!(done.load(Ordering::SeqCst));
    }
}
