//! A blocking queue between two threads, bounded by the bytes it holds as well as by its length.
//!
//! The object stream's decode thread and apply thread run at rates that swap with the content:
//! on a stretch of small files the apply thread is the slow one (a create, a rename and
//! metadata calls per file), on large compressible files the decoder is. A queue bounded by
//! count alone is either too short to carry the decoder through a stretch of small files, or
//! holds too much memory on large ones; bounded by bytes, thousands of small pieces fit in the
//! memory of a few large ones.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Something queued, and the bytes it is charged for.
pub trait Weighed {
    fn weight(&self) -> usize;
}

struct State<T> {
    items: VecDeque<T>,
    bytes: usize,
    sender: bool,
    receiver: bool,
    /// Who waits on `changed` (at most one side at a time: a full queue is not empty), so a
    /// push or pop wakes the other side only when it sleeps.
    sender_waits: bool,
    receiver_waits: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    changed: Condvar,
    max_bytes: usize,
    max_items: usize,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic on the other side leaves the state consistent (every change is one step).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sending half; dropping it ends the queue once its items are read.
pub struct Sender<T>(Arc<Shared<T>>);
/// The receiving half; dropping it makes every later send fail.
pub struct Receiver<T>(Arc<Shared<T>>);

/// A queue that holds at most `max_items` items and, beyond its first item, at most `max_bytes`
/// of weight (one item heavier than `max_bytes` still passes, alone).
pub fn bounded<T: Weighed>(max_bytes: usize, max_items: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            bytes: 0,
            sender: true,
            receiver: true,
            sender_waits: false,
            receiver_waits: false,
        }),
        changed: Condvar::new(),
        max_bytes,
        max_items: max_items.max(1),
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl<T: Weighed> Sender<T> {
    /// Queues `item`, waiting while the queue is full; false (and `item` dropped) once the
    /// receiver is gone.
    pub fn send(&self, item: T) -> bool {
        let q = &self.0;
        let w = item.weight();
        let mut s = q.lock();
        while s.receiver && !s.items.is_empty() && (s.items.len() >= q.max_items || s.bytes + w > q.max_bytes) {
            s.sender_waits = true;
            s = q.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            s.sender_waits = false;
        }
        if !s.receiver {
            return false;
        }
        s.items.push_back(item);
        s.bytes += w;
        if s.receiver_waits {
            q.changed.notify_all();
        }
        true
    }
}

impl<T: Weighed> Receiver<T> {
    /// The next item, waiting for one; `None` once the sender is gone and the queue empty.
    pub fn recv(&self) -> Option<T> {
        let q = &self.0;
        let mut s = q.lock();
        loop {
            if let Some(item) = s.items.pop_front() {
                s.bytes -= item.weight();
                if s.sender_waits {
                    q.changed.notify_all();
                }
                return Some(item);
            }
            if !s.sender {
                return None;
            }
            s.receiver_waits = true;
            s = q.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            s.receiver_waits = false;
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.0.lock().sender = false;
        self.0.changed.notify_all();
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.receiver = false;
        // Queued items go now, not when the sender's thread ends.
        s.items.clear();
        s.bytes = 0;
        drop(s);
        self.0.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    impl Weighed for Vec<u8> {
        fn weight(&self) -> usize {
            self.len()
        }
    }

    #[test]
    fn items_arrive_in_order_and_the_end_is_seen_after_the_last() {
        let (tx, rx) = bounded::<Vec<u8>>(1000, 4);
        let t = std::thread::spawn(move || {
            for i in 0..500u32 {
                assert!(tx.send(vec![(i % 251) as u8; (i % 300) as usize]));
            }
        });
        for i in 0..500u32 {
            assert_eq!(rx.recv().unwrap(), vec![(i % 251) as u8; (i % 300) as usize]);
        }
        assert!(rx.recv().is_none());
        t.join().unwrap();
    }

    /// Fills the queue from a thread until it blocks, and returns how many items it holds then.
    fn queued_before_blocking(max_bytes: usize, max_items: usize, sizes: Vec<usize>) -> (usize, Receiver<Vec<u8>>) {
        let (tx, rx) = bounded::<Vec<u8>>(max_bytes, max_items);
        std::thread::spawn(move || {
            for n in sizes {
                if !tx.send(vec![0; n]) {
                    return;
                }
            }
        });
        wait_for_blocked_sender(&rx);
        let n = rx.0.lock().items.len();
        (n, rx)
    }

    fn wait_for_blocked_sender<T>(rx: &Receiver<T>) {
        wait_for(rx, "the sender never blocked", |s| s.sender_waits);
    }

    /// Polls the queue's state until `cond` holds; fails after 20 s.
    fn wait_for<T>(rx: &Receiver<T>, what: &str, cond: impl Fn(&State<T>) -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !cond(&rx.0.lock()) {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn the_queue_stops_a_sender_at_its_byte_bound_and_at_its_count_bound() {
        // 100-byte items under a 1000-byte bound: ten fit, the eleventh waits.
        let (n, rx) = queued_before_blocking(1000, 1000, vec![100; 50]);
        assert_eq!(n, 10);
        assert_eq!(rx.recv().unwrap().len(), 100);
        // One taken, one more let in, and the sender blocks again.
        wait_for(&rx, "the sender was not let in again", |s| s.sender_waits && s.items.len() == 10);
        // Empty items weigh nothing: the count bound holds them.
        let (n, _rx) = queued_before_blocking(1000, 7, vec![0; 50]);
        assert_eq!(n, 7);
        // One item over the byte bound passes alone.
        let (n, _rx) = queued_before_blocking(1000, 100, vec![5000, 1]);
        assert_eq!(n, 1);
    }

    #[test]
    fn a_sender_blocked_on_a_full_queue_is_released_when_the_receiver_goes() {
        let (tx, rx) = bounded::<Vec<u8>>(10, 1);
        assert!(tx.send(vec![1; 10]));
        let t = std::thread::spawn(move || tx.send(vec![2; 10]));
        wait_for_blocked_sender(&rx);
        drop(rx);
        assert!(!t.join().unwrap(), "the send must fail, not hang");
    }
}
