//! The fixed worker pool both servers feed from their poll loop.
//!
//! Each worker has its own channel. A job goes to the worker chosen by its shard key
//! (a user id), so one user's jobs run in order on one worker. A worker blocks for one
//! job, then drains up to `max_batch - 1` more without waiting and hands the whole batch
//! to its handler, which runs it as one database transaction (group commit). Results go
//! back over [`Completions`], which wakes the poll loop.

use crossbeam_channel::{Receiver, Sender};
use mio::Waker;
use std::sync::Arc;
use std::thread::JoinHandle;

/// Workers fed by sharded channels.
pub struct WorkerPool<J> {
    senders: Vec<Sender<J>>,
    handles: Vec<JoinHandle<()>>,
}

impl<J: Send + 'static> WorkerPool<J> {
    /// Starts `workers` threads named `{name}-{i}`; `make_handler(i)` builds worker i's
    /// batch handler.
    pub fn start<H, F>(
        name: &str,
        workers: usize,
        max_batch: usize,
        mut make_handler: F,
    ) -> std::io::Result<WorkerPool<J>>
    where
        F: FnMut(usize) -> H,
        H: FnMut(Vec<J>) + Send + 'static,
    {
        let workers = workers.max(1);
        let max_batch = max_batch.max(1);
        let mut senders = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for i in 0..workers {
            let (tx, rx) = crossbeam_channel::unbounded();
            let handler = make_handler(i);
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || run_worker(rx, max_batch, handler))?;
            senders.push(tx);
            handles.push(handle);
        }
        Ok(WorkerPool { senders, handles })
    }

    /// A pool with no threads whose jobs all go to the returned receiver: for tests of
    /// a server's protocol logic, which read the jobs it submits.
    pub fn recording() -> (WorkerPool<J>, Receiver<J>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let pool = WorkerPool {
            senders: vec![tx],
            handles: Vec::new(),
        };
        (pool, rx)
    }

    /// Queues `job` on the worker owning `shard`. Returns `false` if that worker has
    /// stopped (only during shutdown).
    pub fn submit(&self, shard: u64, job: J) -> bool {
        if self.senders.is_empty() {
            return false;
        }
        let i = (shard % self.senders.len() as u64) as usize;
        self.senders[i].send(job).is_ok()
    }

    /// Jobs queued and not yet taken by a worker.
    pub fn queue_depth(&self) -> usize {
        self.senders.iter().map(Sender::len).sum()
    }

    /// Stops taking jobs, lets every worker finish what is queued, and waits for them.
    /// Later submissions are refused.
    pub fn shutdown(&mut self) {
        self.senders.clear();
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

fn run_worker<J, H: FnMut(Vec<J>)>(rx: Receiver<J>, max_batch: usize, mut handler: H) {
    while let Ok(first) = rx.recv() {
        let mut batch = Vec::with_capacity(max_batch.min(64));
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        handler(batch);
    }
}

/// The way results travel from workers back to the poll loop.
pub struct Completions<C> {
    tx: Sender<C>,
    waker: Arc<Waker>,
}

impl<C> Clone for Completions<C> {
    fn clone(&self) -> Self {
        Completions {
            tx: self.tx.clone(),
            waker: self.waker.clone(),
        }
    }
}

impl<C> Completions<C> {
    /// A channel whose receiving end the poll loop drains when `waker` fires.
    pub fn new(waker: Arc<Waker>) -> (Completions<C>, Receiver<C>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (Completions { tx, waker }, rx)
    }

    /// Sends results and wakes the poll loop once.
    pub fn send_all(&self, results: impl IntoIterator<Item = C>) {
        let mut any = false;
        for r in results {
            any = true;
            // The poll loop holds the receiver until it exits; after that nobody waits.
            let _ = self.tx.send(r);
        }
        if any {
            let _ = self.waker.wake();
        }
    }

    /// Sends one result and wakes the poll loop.
    pub fn send(&self, result: C) {
        self.send_all(std::iter::once(result));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn same_shard_keeps_order_and_batches() {
        let seen = Arc::new(Mutex::new(Vec::<(usize, Vec<u32>)>::new()));
        let pool = WorkerPool::start("t", 3, 10, |i| {
            let seen = seen.clone();
            move |batch: Vec<u32>| seen.lock().unwrap().push((i, batch))
        })
        .unwrap();
        let mut pool = pool;
        for n in 0..100u32 {
            assert!(pool.submit(7, n));
        }
        pool.shutdown();
        assert!(!pool.submit(7, 0));
        let seen = seen.lock().unwrap();
        let worker = seen[0].0;
        assert!(seen.iter().all(|(i, b)| *i == worker && b.len() <= 10));
        let all: Vec<u32> = seen.iter().flat_map(|(_, b)| b.clone()).collect();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
    }
}
