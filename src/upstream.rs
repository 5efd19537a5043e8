//! Upstream clusters as one worker sees them: their backends, the
//! balancing state (smooth weighted round robin, as nginx does it), the
//! worker's idle keep-alive connections to each backend and its count of
//! active ones. Sockets themselves live in the worker's connection slab;
//! this module only holds their slab indices.

use std::time::Duration;

use crate::config::{BackendAddr, ClusterConfig};

/// One backend of a cluster.
#[derive(Debug)]
pub struct Backend {
    pub addr: BackendAddr,
    pub weight: i64,
    /// Smooth WRR running weight.
    current: i64,
    /// Slab indices of idle pooled connections, most recent last.
    pub idle: Vec<usize>,
    /// Connections of this worker in use for requests.
    pub active: usize,
}

/// A cluster's runtime state in one worker.
#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub backends: Vec<Backend>,
    pub keepalive: usize,
    pub keepalive_timeout: Duration,
    pub retries: u32,
}

impl Cluster {
    pub fn new(c: &ClusterConfig) -> Cluster {
        Cluster {
            name: c.name.clone(),
            backends: c
                .backends
                .iter()
                .map(|b| Backend {
                    addr: b.addr.clone(),
                    weight: b.weight as i64,
                    current: 0,
                    idle: Vec::new(),
                    active: 0,
                })
                .collect(),
            keepalive: c.keepalive,
            keepalive_timeout: c.keepalive_timeout,
            retries: c.retries,
        }
    }

    /// Picks a backend by smooth weighted round robin, skipping those whose
    /// bit is set in `tried` (backends already tried for this request).
    pub fn pick(&mut self, tried: u64) -> Option<usize> {
        let mut total = 0;
        let mut best: Option<(usize, i64)> = None;
        for (i, b) in self.backends.iter_mut().enumerate() {
            if i < 64 && tried & (1 << i) != 0 {
                continue;
            }
            b.current += b.weight;
            total += b.weight;
            if best.is_none_or(|(_, cur)| b.current > cur) {
                best = Some((i, b.current));
            }
        }
        let (i, _) = best?;
        self.backends[i].current -= total;
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendSpec;

    fn cluster(specs: &[&str]) -> Cluster {
        Cluster::new(&ClusterConfig {
            name: "c".into(),
            backends: specs.iter().map(|s| BackendSpec::parse(s).unwrap()).collect(),
            keepalive: 1,
            keepalive_timeout: Duration::from_secs(1),
            retries: 1,
        })
    }

    #[test]
    fn smooth_weighted_round_robin() {
        let mut c = cluster(&["127.0.0.1:1 weight=5", "127.0.0.1:2", "127.0.0.1:3"]);
        let picks: Vec<usize> = (0..7).map(|_| c.pick(0).unwrap()).collect();
        // nginx's documented sequence for weights 5, 1, 1: a a b a c a a.
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn skips_tried_backends() {
        let mut c = cluster(&["127.0.0.1:1", "127.0.0.1:2"]);
        for _ in 0..4 {
            assert_eq!(c.pick(0b01), Some(1));
        }
        assert_eq!(c.pick(0b11), None);
    }
}
