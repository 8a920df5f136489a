//! The fixed worker pool both servers feed from their poll loop.
//!
//! Each worker has its own channel. A job goes to the worker chosen by its shard key
//! (a user id), so one user's jobs run in order on one worker. A worker blocks for one
//! job, then drains up to `max_batch - 1` more without waiting and hands the whole batch
//! to its handler, which runs it as one database transaction (group commit). Results go
//! back over [`Completions`], which wakes the poll loop.
//!
//! A pool may bound each worker's queue ([`WorkerPool::bounded`]): then
//! [`WorkerPool::try_submit`] refuses a job when its worker already has that many
//! waiting, so a flood is answered at once instead of making everyone behind it wait.
//! [`Alive`] lets a job's connection say it has gone, so a worker skips work nobody
//! waits for.

use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::Waker;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Whether the connection a job answers is still open: set by the poll loop when it
/// closes, read by the worker before it starts the job.
#[derive(Clone, Debug)]
pub struct Alive(Arc<AtomicBool>);

impl Alive {
    pub fn new() -> Alive {
        Alive(Arc::new(AtomicBool::new(true)))
    }

    /// The connection has closed: its jobs are not worth running.
    pub fn end(&self) {
        self.0.store(false, Ordering::Relaxed);
    }

    pub fn is_alive(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl Default for Alive {
    fn default() -> Self {
        Alive::new()
    }
}

/// Why [`WorkerPool::try_submit`] did not queue a job.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The worker already has as many jobs waiting as the pool allows.
    Full,
    /// The pool is stopping.
    Stopped,
}

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
        make_handler: F,
    ) -> std::io::Result<WorkerPool<J>>
    where
        F: FnMut(usize) -> H,
        H: FnMut(Vec<J>) + Send + 'static,
    {
        WorkerPool::bounded(name, workers, max_batch, None, make_handler)
    }

    /// As [`WorkerPool::start`], with at most `capacity` jobs waiting per worker (`None`:
    /// no bound) for [`WorkerPool::try_submit`].
    pub fn bounded<H, F>(
        name: &str,
        workers: usize,
        max_batch: usize,
        capacity: Option<usize>,
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
            let (tx, rx) = channel(capacity);
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
    pub fn recording(capacity: Option<usize>) -> (WorkerPool<J>, Receiver<J>) {
        let (tx, rx) = channel(capacity);
        let pool = WorkerPool {
            senders: vec![tx],
            handles: Vec::new(),
        };
        (pool, rx)
    }

    /// Queues `job` on the worker owning `shard`, waiting for room in a bounded pool.
    /// Returns `false` if that worker has stopped (only during shutdown).
    pub fn submit(&self, shard: u64, job: J) -> bool {
        if self.senders.is_empty() {
            return false;
        }
        let i = (shard % self.senders.len() as u64) as usize;
        self.senders[i].send(job).is_ok()
    }

    /// Queues `job` on the worker owning `shard` unless its queue is full; never waits.
    pub fn try_submit(&self, shard: u64, job: J) -> Result<(), Refused> {
        if self.senders.is_empty() {
            return Err(Refused::Stopped);
        }
        let i = (shard % self.senders.len() as u64) as usize;
        self.senders[i].try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => Refused::Full,
            TrySendError::Disconnected(_) => Refused::Stopped,
        })
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

fn channel<J>(capacity: Option<usize>) -> (Sender<J>, Receiver<J>) {
    match capacity {
        Some(n) => crossbeam_channel::bounded(n.max(1)),
        None => crossbeam_channel::unbounded(),
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

    #[test]
    fn a_bounded_pool_refuses_beyond_its_capacity_without_waiting() {
        let (pool, jobs) = WorkerPool::<u32>::recording(Some(2));
        assert_eq!(pool.try_submit(1, 1), Ok(()));
        assert_eq!(pool.try_submit(1, 2), Ok(()));
        assert_eq!(pool.try_submit(1, 3), Err(Refused::Full));
        assert_eq!(jobs.try_recv(), Ok(1));
        assert_eq!(pool.try_submit(1, 4), Ok(()));
        assert_eq!(jobs.try_iter().collect::<Vec<_>>(), [2, 4]);
        let mut pool = pool;
        pool.shutdown();
        assert_eq!(pool.try_submit(1, 5), Err(Refused::Stopped));
    }

    #[test]
    fn alive_is_shared_by_its_clones() {
        let a = Alive::new();
        let job_copy = a.clone();
        assert!(job_copy.is_alive());
        a.end();
        assert!(!job_copy.is_alive());
    }
}
