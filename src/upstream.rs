//! Upstream clusters as one worker sees them.
//!
//! Two lifetimes meet here. A [`Cluster`] belongs to one configuration
//! snapshot: its members, weights and balancing state are replaced by a
//! reload. A [`BackendRt`] belongs to the worker and is keyed by address:
//! its idle keep-alive connections and counters survive every reload that
//! keeps the address, so pools of unchanged clusters are not lost. Sockets
//! live in the worker's connection slab; this module holds slab indices.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::time::Duration;

use crate::config::{BackendAddr, ClusterConfig};

/// The worker's state for one backend address.
#[derive(Debug)]
pub struct BackendRt {
    pub addr: BackendAddr,
    /// Slab indices of idle pooled connections, most recent last.
    pub idle: Vec<usize>,
    /// Connections of this worker in use for requests.
    pub active: usize,
    /// No cluster of the current configuration names it any more.
    pub retired: bool,
}

/// All backends a worker has known, by stable id. Ids are never reused, so
/// a request still running on an old snapshot can not reach a different
/// backend through a stale id.
#[derive(Debug, Default)]
pub struct Backends {
    list: Vec<BackendRt>,
    by_addr: HashMap<BackendAddr, usize>,
}

impl Backends {
    /// The id of `addr`, creating its state when new (or reviving it).
    pub fn id_for(&mut self, addr: &BackendAddr) -> usize {
        if let Some(&id) = self.by_addr.get(addr) {
            self.list[id].retired = false;
            return id;
        }
        let id = self.list.len();
        self.list.push(BackendRt { addr: addr.clone(), idle: Vec::new(), active: 0, retired: false });
        self.by_addr.insert(addr.clone(), id);
        id
    }

    pub fn get(&self, id: usize) -> &BackendRt {
        &self.list[id]
    }

    pub fn get_mut(&mut self, id: usize) -> &mut BackendRt {
        &mut self.list[id]
    }

    /// Marks every backend retired; [`id_for`](Self::id_for) revives those
    /// the new configuration still names.
    pub fn retire_all(&mut self) {
        for b in &mut self.list {
            b.retired = true;
        }
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut BackendRt> {
        self.list.iter_mut()
    }
}

/// A backend as a member of a cluster.
#[derive(Debug)]
pub struct Member {
    /// Id in the worker's [`Backends`].
    pub id: usize,
    pub weight: i64,
    /// Smooth WRR running weight. Atomic only so that a snapshot is `Sync`
    /// (one worker thread uses it; relaxed loads and stores are plain moves).
    current: AtomicI64,
}

/// A cluster of one configuration snapshot.
#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub members: Vec<Member>,
    pub keepalive: usize,
    pub keepalive_timeout: Duration,
    pub retries: u32,
}

impl Cluster {
    pub fn new(c: &ClusterConfig, backends: &mut Backends) -> Cluster {
        Cluster {
            name: c.name.clone(),
            members: c
                .backends
                .iter()
                .map(|b| Member { id: backends.id_for(&b.addr), weight: b.weight as i64, current: AtomicI64::new(0) })
                .collect(),
            keepalive: c.keepalive,
            keepalive_timeout: c.keepalive_timeout,
            retries: c.retries,
        }
    }

    /// Picks a member by smooth weighted round robin (nginx's algorithm),
    /// skipping those whose bit is set in `tried` (members already tried
    /// for this request). Returns the member index.
    pub fn pick(&self, tried: u64) -> Option<usize> {
        let mut total = 0;
        let mut best: Option<(usize, i64)> = None;
        for (i, m) in self.members.iter().enumerate() {
            if i < 64 && tried & (1 << i) != 0 {
                continue;
            }
            let cur = m.current.load(Relaxed) + m.weight;
            m.current.store(cur, Relaxed);
            total += m.weight;
            if best.is_none_or(|(_, b)| cur > b) {
                best = Some((i, cur));
            }
        }
        let (i, _) = best?;
        let m = &self.members[i];
        m.current.store(m.current.load(Relaxed) - total, Relaxed);
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendSpec;

    fn cluster(specs: &[&str], backends: &mut Backends) -> Cluster {
        Cluster::new(
            &ClusterConfig {
                name: "c".into(),
                backends: specs.iter().map(|s| BackendSpec::parse(s).unwrap()).collect(),
                keepalive: 1,
                keepalive_timeout: Duration::from_secs(1),
                retries: 1,
            },
            backends,
        )
    }

    #[test]
    fn smooth_weighted_round_robin() {
        let c = cluster(&["127.0.0.1:1 weight=5", "127.0.0.1:2", "127.0.0.1:3"], &mut Backends::default());
        let picks: Vec<usize> = (0..7).map(|_| c.pick(0).unwrap()).collect();
        // nginx's documented sequence for weights 5, 1, 1: a a b a c a a.
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn skips_tried_backends() {
        let c = cluster(&["127.0.0.1:1", "127.0.0.1:2"], &mut Backends::default());
        for _ in 0..4 {
            assert_eq!(c.pick(0b01), Some(1));
        }
        assert_eq!(c.pick(0b11), None);
    }

    #[test]
    fn backend_ids_survive_a_new_cluster_definition() {
        let mut b = Backends::default();
        let c1 = cluster(&["127.0.0.1:1", "127.0.0.1:2"], &mut b);
        b.retire_all();
        let c2 = cluster(&["127.0.0.1:2", "127.0.0.1:3"], &mut b);
        assert_eq!(c1.members[1].id, c2.members[0].id);
        assert!(b.get(c1.members[0].id).retired);
        assert!(!b.get(c2.members[1].id).retired);
    }
}
