//! A fixed-capacity LRU map for the reflector's session and rate-limit tables.
//!
//! All memory is reserved up front (map and node slab), so a flood of new sources neither
//! allocates on the hot path nor grows the table: the least recently used entry is recycled.
use std::{collections::HashMap, hash::Hash};

const NIL: u32 = u32::MAX;

struct Node<K, V> {
    key: K,
    val: V,
    prev: u32,
    next: u32,
}

/// What [`Lru::get_or_insert_with`] had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// The key was present.
    Hit,
    /// The key was added to free space.
    Inserted,
    /// The key was added in place of the least recently used entry.
    Evicted,
}

pub struct Lru<K, V> {
    // SipHash (the std default) on purpose: keys come from the network, and a keyed hash
    // keeps a crafted set of sources from degrading the map.
    map: HashMap<K, u32>,
    nodes: Vec<Node<K, V>>,
    /// Most recently used.
    head: u32,
    /// Least recently used: the next one out.
    tail: u32,
    cap: usize,
}

impl<K: Hash + Eq + Copy, V> Lru<K, V> {
    /// `cap` is clamped to 1..=u32::MAX-1 so the node indices fit.
    pub fn new(cap: usize) -> Self {
        let cap = cap.clamp(1, (NIL - 1) as usize);
        Lru {
            map: HashMap::with_capacity(cap),
            nodes: Vec::with_capacity(cap),
            head: NIL,
            tail: NIL,
            cap,
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Without touching the recency order.
    pub fn peek(&self, key: &K) -> Option<&V> {
        self.map.get(key).map(|&i| &self.nodes[i as usize].val)
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let n = &self.nodes[i as usize];
            (n.prev, n.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let n = &mut self.nodes[i as usize];
            n.prev = NIL;
            n.next = old;
        }
        match old {
            NIL => self.tail = i,
            o => self.nodes[o as usize].prev = i,
        }
        self.head = i;
    }

    /// The entry for `key`, marked most recently used; created with `make` if absent, in place
    /// of the least recently used entry when full.
    pub fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> (&mut V, Slot) {
        if let Some(&i) = self.map.get(&key) {
            if self.head != i {
                self.unlink(i);
                self.push_front(i);
            }
            return (&mut self.nodes[i as usize].val, Slot::Hit);
        }
        let (i, slot) = if self.nodes.len() < self.cap {
            self.nodes.push(Node {
                key,
                val: make(),
                prev: NIL,
                next: NIL,
            });
            ((self.nodes.len() - 1) as u32, Slot::Inserted)
        } else {
            let i = self.tail;
            self.unlink(i);
            let n = &mut self.nodes[i as usize];
            self.map.remove(&n.key);
            n.key = key;
            n.val = make();
            (i, Slot::Evicted)
        };
        self.map.insert(key, i);
        self.push_front(i);
        (&mut self.nodes[i as usize].val, slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let mut l: Lru<u32, u32> = Lru::new(3);
        for k in 0..3 {
            assert_eq!(l.get_or_insert_with(k, || k * 10).1, Slot::Inserted);
        }
        // Touch 0, so 1 is now the oldest.
        assert_eq!(l.get_or_insert_with(0, || 99), (&mut 0, Slot::Hit));
        assert_eq!(l.get_or_insert_with(3, || 30).1, Slot::Evicted);
        assert!(l.peek(&1).is_none());
        assert_eq!(l.peek(&0), Some(&0));
        assert_eq!(l.peek(&2), Some(&20));
        assert_eq!(l.peek(&3), Some(&30));
        assert_eq!(l.len(), 3);
        // Next out: 2, then 0.
        assert_eq!(l.get_or_insert_with(4, || 40).1, Slot::Evicted);
        assert!(l.peek(&2).is_none());
        assert_eq!(l.get_or_insert_with(5, || 50).1, Slot::Evicted);
        assert!(l.peek(&0).is_none());
    }

    #[test]
    fn capacity_one_and_values_persist() {
        let mut l: Lru<u8, u64> = Lru::new(0);
        assert_eq!(l.capacity(), 1);
        *l.get_or_insert_with(1, || 0).0 += 5;
        *l.get_or_insert_with(1, || 0).0 += 5;
        assert_eq!(l.peek(&1), Some(&10));
        assert_eq!(l.get_or_insert_with(2, || 7).1, Slot::Evicted);
        assert_eq!(l.peek(&2), Some(&7));
        assert!(l.peek(&1).is_none());
    }

    #[test]
    fn random_ops_match_a_model() {
        use rand::{rngs::SmallRng, Rng, SeedableRng};
        let mut rng = SmallRng::seed_from_u64(7);
        let mut l: Lru<u16, u32> = Lru::new(16);
        // The model: keys ordered from least to most recently used.
        let mut model: Vec<u16> = Vec::new();
        for step in 0..50_000u32 {
            let k = rng.gen_range(0..40u16);
            let (_, slot) = l.get_or_insert_with(k, || step);
            let expect = if let Some(p) = model.iter().position(|&m| m == k) {
                model.remove(p);
                Slot::Hit
            } else if model.len() < 16 {
                Slot::Inserted
            } else {
                model.remove(0);
                Slot::Evicted
            };
            model.push(k);
            assert_eq!(slot, expect, "step {step}");
            assert_eq!(l.len(), model.len());
        }
        for k in 0..40 {
            assert_eq!(l.peek(&k).is_some(), model.contains(&k));
        }
    }
}
