//! The in-memory dispatch queue: the tasks this scaler believes are `queued` and has not yet
//! sent to a worker, highest priority first and, within a priority, first come first served.
//! It is a cache of the database (the source of truth), so it may forget an entry at any time
//! (when full, or on a restart): the periodic scan puts it back.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use transcode_core::TaskId;

/// One task waiting for a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueItem {
    pub id: TaskId,
    pub priority: i32,
    /// The attempt the next claim will make (`attempts + 1` when the row was read), sent in the
    /// TASK frame so the worker can report it before its claim returns.
    pub attempt: u32,
}

/// Ordering key: priority descending, then arrival order.
type Key = (Reverse<i32>, u64);

/// What [`PriorityQueue::push`] did with an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Added,
    /// Already queued; the first entry keeps its place.
    Duplicate,
    /// Added, and the lowest-ranked entry was evicted to make room (the scan finds it again).
    AddedEvicting(TaskId),
    /// Full, and the item ranks below everything queued; the scan finds it later.
    Full,
}

/// A priority queue deduplicated by task id, with a capacity.
#[derive(Debug)]
pub struct PriorityQueue {
    order: BTreeMap<Key, QueueItem>,
    index: HashMap<TaskId, Key>,
    seq: u64,
    capacity: usize,
}

impl PriorityQueue {
    pub fn new(capacity: usize) -> Self {
        PriorityQueue {
            order: BTreeMap::new(),
            index: HashMap::new(),
            seq: 0,
            capacity: capacity.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn contains(&self, id: &TaskId) -> bool {
        self.index.contains_key(id)
    }

    pub fn push(&mut self, item: QueueItem) -> Pushed {
        if self.index.contains_key(&item.id) {
            return Pushed::Duplicate;
        }
        let key = (Reverse(item.priority), self.seq);
        let mut evicted = None;
        if self.order.len() >= self.capacity {
            // The last key ranks lowest; a newcomer only displaces it when it ranks higher,
            // which (arrival order being a tie-break) means a strictly higher priority.
            match self.order.last_key_value() {
                Some((&last, _)) if key < last => {
                    if let Some((_, old)) = self.order.pop_last() {
                        self.index.remove(&old.id);
                        evicted = Some(old.id);
                    }
                }
                _ => return Pushed::Full,
            }
        }
        self.seq += 1;
        self.order.insert(key, item);
        self.index.insert(item.id, key);
        match evicted {
            Some(id) => Pushed::AddedEvicting(id),
            None => Pushed::Added,
        }
    }

    /// The next task to dispatch, without removing it.
    pub fn peek(&self) -> Option<&QueueItem> {
        self.order.first_key_value().map(|(_, v)| v)
    }

    pub fn pop(&mut self) -> Option<QueueItem> {
        let (_, item) = self.order.pop_first()?;
        self.index.remove(&item.id);
        Some(item)
    }

    pub fn remove(&mut self, id: &TaskId) -> Option<QueueItem> {
        let key = self.index.remove(id)?;
        self.order.remove(&key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn item(priority: i32) -> QueueItem {
        QueueItem {
            id: Uuid::new_v4(),
            priority,
            attempt: 1,
        }
    }

    #[test]
    fn highest_priority_first_then_fifo() {
        let mut q = PriorityQueue::new(100);
        let low1 = item(-5);
        let mid1 = item(0);
        let high = item(10);
        let mid2 = item(0);
        let low2 = item(-5);
        for i in [low1, mid1, high, mid2, low2] {
            assert_eq!(q.push(i), Pushed::Added);
        }
        let order: Vec<TaskId> = std::iter::from_fn(|| q.pop()).map(|i| i.id).collect();
        assert_eq!(order, vec![high.id, mid1.id, mid2.id, low1.id, low2.id]);
        assert!(q.is_empty());
    }

    #[test]
    fn dedup_keeps_the_first_place() {
        let mut q = PriorityQueue::new(100);
        let a = item(0);
        let b = item(0);
        q.push(a);
        q.push(b);
        // Pushing `a` again, even with a higher priority, neither moves nor duplicates it.
        assert_eq!(q.push(QueueItem { priority: 50, ..a }), Pushed::Duplicate);
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop().map(|i| i.id), Some(a.id));
        assert_eq!(q.pop().map(|i| i.id), Some(b.id));
        // Once popped, it can be queued again.
        assert_eq!(q.push(a), Pushed::Added);
    }

    #[test]
    fn remove_and_contains() {
        let mut q = PriorityQueue::new(10);
        let a = item(1);
        let b = item(2);
        q.push(a);
        q.push(b);
        assert!(q.contains(&a.id));
        assert_eq!(q.remove(&a.id), Some(a));
        assert!(!q.contains(&a.id));
        assert_eq!(q.remove(&a.id), None);
        assert_eq!(q.peek().map(|i| i.id), Some(b.id));
    }

    #[test]
    fn capacity_evicts_lowest_or_refuses() {
        let mut q = PriorityQueue::new(2);
        let a = item(0);
        let b = item(0);
        q.push(a);
        q.push(b);
        // Same priority as the lowest: it would rank after it, so it is refused.
        assert_eq!(q.push(item(0)), Pushed::Full);
        // Higher priority: the newest of the lowest rank goes.
        let c = item(1);
        assert_eq!(q.push(c), Pushed::AddedEvicting(b.id));
        assert_eq!(q.len(), 2);
        assert!(!q.contains(&b.id));
        assert_eq!(q.pop().map(|i| i.id), Some(c.id));
        assert_eq!(q.pop().map(|i| i.id), Some(a.id));
    }
}
