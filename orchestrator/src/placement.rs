//! Placement decisions: pure functions over a snapshot of node capacity, so
//! every strategy is unit-tested without etcd.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::resources::{Resources, GPU, UNIT};

/// Ray's four placement group strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Strategy {
    /// As few nodes as possible, best effort.
    Pack,
    /// Across distinct nodes, best effort.
    Spread,
    /// All bundles on one node, or fail.
    StrictPack,
    /// Every bundle on its own node, or fail.
    StrictSpread,
}

impl FromStr for Strategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "PACK" => Ok(Strategy::Pack),
            "SPREAD" => Ok(Strategy::Spread),
            "STRICT_PACK" => Ok(Strategy::StrictPack),
            "STRICT_SPREAD" => Ok(Strategy::StrictSpread),
            other => Err(Error::invalid(
                "strategy",
                format!("unknown strategy '{other}' (expected PACK, SPREAD, STRICT_PACK or STRICT_SPREAD)"),
            )),
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Pack => "PACK",
            Strategy::Spread => "SPREAD",
            Strategy::StrictPack => "STRICT_PACK",
            Strategy::StrictSpread => "STRICT_SPREAD",
        })
    }
}

/// What the scheduler knows about one live node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub id: String,
    pub total: Resources,
    pub avail: Resources,
    /// GPU ids as the node's processes see them (after CUDA_VISIBLE_DEVICES).
    pub gpu_ids: Vec<u32>,
    /// Free fixed-point share of each GPU in `gpu_ids`, same order.
    pub gpu_free: Vec<u64>,
}

impl NodeView {
    /// A node with nothing allocated.
    pub fn idle(id: &str, total: Resources, gpu_ids: Vec<u32>) -> Self {
        let gpu_free = vec![UNIT; gpu_ids.len()];
        NodeView {
            id: id.to_string(),
            avail: total.clone(),
            total,
            gpu_ids,
            gpu_free,
        }
    }

    fn fresh(&self) -> NodeView {
        NodeView::idle(&self.id, self.total.clone(), self.gpu_ids.clone())
    }

    /// Takes `gpus` (id, share) out of this node's free capacity; used to
    /// replay existing allocations when building a snapshot.
    pub fn take(&mut self, r: &Resources, gpus: &[GpuShare]) {
        self.avail.sub(r);
        for g in gpus {
            if let Some(i) = self.gpu_ids.iter().position(|x| *x == g.id) {
                self.gpu_free[i] = self.gpu_free[i].saturating_sub(g.share);
            }
        }
    }

    /// Reserves `r` here if it fits, choosing concrete GPU ids.
    pub fn try_fit(&mut self, r: &Resources) -> Option<Vec<GpuShare>> {
        if !r.fits_in(&self.avail) {
            return None;
        }
        let gpus = pick_gpus(&self.gpu_free, &self.gpu_ids, r.get(GPU))?;
        self.take(r, &gpus);
        Some(gpus)
    }
}

/// A share of one GPU: `share` is fixed point, UNIT == the whole device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuShare {
    pub id: u32,
    pub share: u64,
}

/// Fractions go on the fullest GPU that still has room (so two 0.5 requests
/// share one id); whole GPUs need devices nobody else uses.
fn pick_gpus(free: &[u64], ids: &[u32], amount: u64) -> Option<Vec<GpuShare>> {
    if amount == 0 {
        return Some(Vec::new());
    }
    if amount < UNIT {
        let best = (0..free.len())
            .filter(|&i| free[i] >= amount)
            .min_by_key(|&i| (free[i], i))?;
        return Some(vec![GpuShare {
            id: ids[best],
            share: amount,
        }]);
    }
    let want = (amount / UNIT) as usize;
    let whole: Vec<usize> = (0..free.len()).filter(|&i| free[i] == UNIT).collect();
    if whole.len() < want {
        return None;
    }
    Some(
        whole[..want]
            .iter()
            .map(|&i| GpuShare {
                id: ids[i],
                share: UNIT,
            })
            .collect(),
    )
}

/// Where one bundle went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub node_id: String,
    pub gpus: Vec<GpuShare>,
}

/// Why a request could not be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlaceError {
    /// No set of the live nodes could ever hold it, even empty.
    Infeasible,
    /// It would fit the nodes' totals, but not what is free now.
    Busy,
}

/// Places `bundles` on `nodes`. `occupied` lists nodes that already hold other
/// bundles of the same group (when rescheduling the bundles of a lost node).
pub fn place(
    nodes: &[NodeView],
    bundles: &[Resources],
    strategy: Strategy,
    occupied: &[String],
) -> std::result::Result<Vec<Assignment>, PlaceError> {
    let mut work = nodes.to_vec();
    let placed = match strategy {
        Strategy::StrictPack => strict_pack(&mut work, bundles, occupied),
        Strategy::Pack => pack(&mut work, bundles, occupied),
        Strategy::Spread => spread(&mut work, bundles, occupied),
        Strategy::StrictSpread => strict_spread(&mut work, bundles, occupied),
    };
    if let Some(p) = placed {
        return Ok(p);
    }
    let mut fresh: Vec<NodeView> = nodes.iter().map(NodeView::fresh).collect();
    let could = match strategy {
        Strategy::StrictPack => strict_pack(&mut fresh, bundles, occupied).is_some(),
        Strategy::StrictSpread => strict_spread(&mut fresh, bundles, occupied).is_some(),
        // Best-effort strategies need each bundle to fit some node alone,
        // and the cluster as a whole to hold them all at once.
        Strategy::Pack | Strategy::Spread => {
            bundles
                .iter()
                .all(|b| nodes.iter().any(|n| n.fresh().try_fit(b).is_some()))
                && fits_cluster_total(nodes, bundles)
        }
    };
    Err(if could {
        PlaceError::Busy
    } else {
        PlaceError::Infeasible
    })
}

/// Whether the live nodes' totals, summed, can hold all of `bundles` at
/// once. When they cannot, no amount of waiting for other groups to go
/// helps: the request is infeasible, not busy.
pub fn fits_cluster_total(nodes: &[NodeView], bundles: &[Resources]) -> bool {
    let mut total = Resources::new();
    for n in nodes {
        total.add(&n.total);
    }
    let mut want = Resources::new();
    for b in bundles {
        want.add(b);
    }
    want.fits_in(&total)
}

/// Order for "tightest fit first": least free GPU, then CPU, then id.
fn tight_key(n: &NodeView) -> (u64, u64, String) {
    (n.avail.get(GPU), n.avail.get("CPU"), n.id.clone())
}

fn strict_pack(
    work: &mut [NodeView],
    bundles: &[Resources],
    occupied: &[String],
) -> Option<Vec<Assignment>> {
    let mut order: Vec<usize> = (0..work.len())
        .filter(|&i| occupied.is_empty() || occupied.contains(&work[i].id))
        .collect();
    order.sort_by_key(|&i| tight_key(&work[i]));
    for i in order {
        let mut trial = work[i].clone();
        let mut out = Vec::with_capacity(bundles.len());
        let ok = bundles.iter().all(|b| match trial.try_fit(b) {
            Some(gpus) => {
                out.push(Assignment {
                    node_id: trial.id.clone(),
                    gpus,
                });
                true
            }
            None => false,
        });
        if ok {
            work[i] = trial;
            return Some(out);
        }
    }
    None
}

fn pack(
    work: &mut [NodeView],
    bundles: &[Resources],
    occupied: &[String],
) -> Option<Vec<Assignment>> {
    // One node if any can take the whole group, preferring the group's nodes.
    if !occupied.is_empty() {
        let mut w = work.to_vec();
        if let Some(p) = strict_pack(&mut w, bundles, occupied) {
            work.clone_from_slice(&w);
            return Some(p);
        }
    }
    if let Some(p) = strict_pack(work, bundles, &[]) {
        return Some(p);
    }
    let mut used: Vec<String> = occupied.to_vec();
    let mut out = Vec::with_capacity(bundles.len());
    for b in bundles {
        let mut placed = None;
        for id in &used {
            if let Some(n) = work.iter_mut().find(|n| &n.id == id) {
                if let Some(gpus) = n.try_fit(b) {
                    placed = Some(Assignment {
                        node_id: n.id.clone(),
                        gpus,
                    });
                    break;
                }
            }
        }
        if placed.is_none() {
            // A new node: the roomiest, so the following bundles join it.
            let mut order: Vec<usize> = (0..work.len())
                .filter(|&i| !used.contains(&work[i].id))
                .collect();
            order.sort_by_key(|&i| {
                let k = tight_key(&work[i]);
                (std::cmp::Reverse(k.0), std::cmp::Reverse(k.1), k.2)
            });
            for i in order {
                if let Some(gpus) = work[i].try_fit(b) {
                    used.push(work[i].id.clone());
                    placed = Some(Assignment {
                        node_id: work[i].id.clone(),
                        gpus,
                    });
                    break;
                }
            }
        }
        out.push(placed?);
    }
    Some(out)
}

fn spread(
    work: &mut [NodeView],
    bundles: &[Resources],
    occupied: &[String],
) -> Option<Vec<Assignment>> {
    let mut count: Vec<usize> = work
        .iter()
        .map(|n| occupied.iter().filter(|o| **o == n.id).count())
        .collect();
    let mut out = Vec::with_capacity(bundles.len());
    for b in bundles {
        // Least used by this group first, then the least loaded node.
        let mut order: Vec<usize> = (0..work.len()).collect();
        order.sort_by_key(|&i| {
            let k = tight_key(&work[i]);
            (
                count[i],
                std::cmp::Reverse(k.0),
                std::cmp::Reverse(k.1),
                k.2,
            )
        });
        let mut placed = None;
        for i in order {
            if let Some(gpus) = work[i].try_fit(b) {
                count[i] += 1;
                placed = Some(Assignment {
                    node_id: work[i].id.clone(),
                    gpus,
                });
                break;
            }
        }
        out.push(placed?);
    }
    Some(out)
}

/// Distinct nodes per bundle: a bipartite matching (augmenting paths), so a
/// greedy choice never blocks a placement that exists.
fn strict_spread(
    work: &mut [NodeView],
    bundles: &[Resources],
    occupied: &[String],
) -> Option<Vec<Assignment>> {
    let cand: Vec<usize> = (0..work.len())
        .filter(|&i| !occupied.contains(&work[i].id))
        .collect();
    if cand.len() < bundles.len() {
        return None;
    }
    let fits: Vec<Vec<usize>> = bundles
        .iter()
        .map(|b| {
            cand.iter()
                .copied()
                .filter(|&i| work[i].clone().try_fit(b).is_some())
                .collect()
        })
        .collect();
    let mut node_of: Vec<Option<usize>> = vec![None; bundles.len()];
    let mut bundle_on: std::collections::HashMap<usize, usize> = Default::default();
    fn augment(
        b: usize,
        fits: &[Vec<usize>],
        seen: &mut BTreeSet<usize>,
        node_of: &mut [Option<usize>],
        bundle_on: &mut std::collections::HashMap<usize, usize>,
    ) -> bool {
        for &n in &fits[b] {
            if !seen.insert(n) {
                continue;
            }
            let free = match bundle_on.get(&n) {
                None => true,
                Some(&other) => augment(other, fits, seen, node_of, bundle_on),
            };
            if free {
                node_of[b] = Some(n);
                bundle_on.insert(n, b);
                return true;
            }
        }
        false
    }
    for b in 0..bundles.len() {
        // A free node first keeps the natural order; augment only if needed.
        if let Some(&n) = fits[b].iter().find(|n| !bundle_on.contains_key(n)) {
            node_of[b] = Some(n);
            bundle_on.insert(n, b);
            continue;
        }
        let mut seen = BTreeSet::new();
        if !augment(b, &fits, &mut seen, &mut node_of, &mut bundle_on) {
            return None;
        }
    }
    let mut out = Vec::with_capacity(bundles.len());
    for (b, n) in node_of.iter().enumerate() {
        let n = (*n)?;
        let gpus = work[n].try_fit(&bundles[b])?;
        out.push(Assignment {
            node_id: work[n].id.clone(),
            gpus,
        });
    }
    Some(out)
}

/// A one-line description of a request for errors and `status`.
pub fn describe(bundles: &[Resources], strategy: Strategy) -> String {
    let shapes: Vec<String> = bundles.iter().map(|b| b.shape()).collect();
    format!("[{}] (strategy {strategy})", shapes.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::CPU;

    fn node(id: &str, gpus: u32, cpus: f64) -> NodeView {
        let total = Resources::new().with(GPU, gpus as f64).with(CPU, cpus);
        NodeView::idle(id, total, (0..gpus).collect())
    }

    fn gpu(x: f64) -> Resources {
        Resources::new().with(GPU, x)
    }

    fn nodes_of(p: &[Assignment]) -> Vec<&str> {
        p.iter().map(|a| a.node_id.as_str()).collect()
    }

    #[test]
    fn strategies_table() {
        let cluster = vec![node("a", 4, 8.0), node("b", 4, 8.0), node("c", 4, 8.0)];
        type Case<'a> = (
            &'a str,
            Vec<Resources>,
            Strategy,
            std::result::Result<Vec<&'a str>, PlaceError>,
        );
        let cases: Vec<Case> = vec![
            (
                "pack fits one node",
                vec![gpu(1.0); 4],
                Strategy::Pack,
                Ok(vec!["a"; 4]),
            ),
            (
                "pack overflows to a second node",
                vec![gpu(1.0); 6],
                Strategy::Pack,
                Ok(vec!["a", "a", "a", "a", "b", "b"]),
            ),
            (
                "spread one per node",
                vec![gpu(1.0); 3],
                Strategy::Spread,
                Ok(vec!["a", "b", "c"]),
            ),
            (
                "spread wraps when nodes run out",
                vec![gpu(1.0); 4],
                Strategy::Spread,
                Ok(vec!["a", "b", "c", "a"]),
            ),
            (
                "strict pack one node",
                vec![gpu(2.0); 2],
                Strategy::StrictPack,
                Ok(vec!["a", "a"]),
            ),
            (
                "strict pack too big for any node",
                vec![gpu(2.0); 3],
                Strategy::StrictPack,
                Err(PlaceError::Infeasible),
            ),
            (
                "strict spread distinct",
                vec![gpu(1.0); 3],
                Strategy::StrictSpread,
                Ok(vec!["a", "b", "c"]),
            ),
            (
                "strict spread more bundles than nodes",
                vec![gpu(1.0); 4],
                Strategy::StrictSpread,
                Err(PlaceError::Infeasible),
            ),
            (
                "bundle bigger than any node",
                vec![gpu(8.0)],
                Strategy::Pack,
                Err(PlaceError::Infeasible),
            ),
            (
                "unknown custom resource",
                vec![Resources::new().with("tpu", 1.0)],
                Strategy::Spread,
                Err(PlaceError::Infeasible),
            ),
            (
                "eight over three nodes packed",
                vec![gpu(1.0); 8],
                Strategy::Pack,
                Ok(vec!["a", "a", "a", "a", "b", "b", "b", "b"]),
            ),
        ];
        for (name, bundles, strategy, want) in cases {
            let got = place(&cluster, &bundles, strategy, &[]);
            match (got, want) {
                (Ok(p), Ok(w)) => assert_eq!(nodes_of(&p), w, "{name}"),
                (Err(e), Err(w)) => assert_eq!(e, w, "{name}"),
                (g, w) => panic!("{name}: got {g:?}, want {w:?}"),
            }
        }
    }

    #[test]
    fn busy_versus_infeasible() {
        let mut a = node("a", 2, 4.0);
        let r = gpu(2.0);
        let g = a.try_fit(&r).unwrap();
        assert_eq!(g.len(), 2);
        let cluster = vec![a];
        assert_eq!(
            place(&cluster, &[gpu(1.0)], Strategy::Pack, &[]),
            Err(PlaceError::Busy)
        );
        assert_eq!(
            place(&cluster, &[gpu(3.0)], Strategy::Pack, &[]),
            Err(PlaceError::Infeasible)
        );
        assert_eq!(
            place(&cluster, &vec![gpu(1.0); 2], Strategy::StrictPack, &[]),
            Err(PlaceError::Busy)
        );
    }

    #[test]
    fn a_group_beyond_the_cluster_total_is_infeasible_not_busy() {
        // Each {CPU: 4} fits a node, but 12 CPUs never fit a cluster of 8.
        let cluster = vec![node("a", 0, 4.0), node("b", 0, 4.0)];
        let cpu4 = Resources::new().with(CPU, 4.0);
        for s in [Strategy::Pack, Strategy::Spread] {
            assert_eq!(
                place(&cluster, &vec![cpu4.clone(); 3], s, &[]),
                Err(PlaceError::Infeasible),
                "{s}"
            );
            assert!(place(&cluster, &vec![cpu4.clone(); 2], s, &[]).is_ok());
        }
        assert!(!fits_cluster_total(&cluster, &vec![cpu4.clone(); 3]));
        assert!(fits_cluster_total(&cluster, &vec![cpu4.clone(); 2]));
        // Within the total but held by another group: busy, it waits.
        let mut busy = cluster.clone();
        busy[0].try_fit(&cpu4).unwrap();
        for s in [Strategy::Pack, Strategy::Spread] {
            assert_eq!(
                place(&busy, &vec![cpu4.clone(); 2], s, &[]),
                Err(PlaceError::Busy),
                "{s}"
            );
        }
    }

    #[test]
    fn half_gpus_share_one_id() {
        let cluster = vec![node("a", 2, 4.0)];
        let p = place(
            &cluster,
            &[gpu(0.5), gpu(0.5), gpu(0.5)],
            Strategy::Pack,
            &[],
        )
        .unwrap();
        assert_eq!(p[0].gpus, vec![GpuShare { id: 0, share: 5000 }]);
        assert_eq!(p[1].gpus, vec![GpuShare { id: 0, share: 5000 }]);
        assert_eq!(p[2].gpus, vec![GpuShare { id: 1, share: 5000 }]);
        // A whole GPU must not land on the half-used device.
        let mut n = node("a", 2, 4.0);
        n.try_fit(&gpu(0.5)).unwrap();
        let g = n.try_fit(&gpu(1.0)).unwrap();
        assert_eq!(g, vec![GpuShare { id: 1, share: UNIT }]);
        assert!(n.try_fit(&gpu(1.0)).is_none());
        assert!(n.try_fit(&gpu(0.5)).is_some());
    }

    #[test]
    fn thirds_are_exact() {
        let cluster = vec![node("a", 1, 4.0)];
        let third = Resources(std::iter::once((GPU.to_string(), 3333)).collect());
        let p = place(&cluster, &vec![third; 3], Strategy::StrictPack, &[]).unwrap();
        assert!(p.iter().all(|a| a.gpus[0].id == 0));
    }

    #[test]
    fn custom_and_memory_resources() {
        let mut big = node("big", 0, 4.0);
        big.total.set("memory", 64 << 30);
        big.avail = big.total.clone();
        let mut special = node("special", 0, 4.0);
        special.total.set("accelerator_type:H100", UNIT);
        special.avail = special.total.clone();
        let cluster = vec![big, special];
        let p = place(
            &cluster,
            &[Resources::new().with("accelerator_type:H100", 0.001)],
            Strategy::Pack,
            &[],
        )
        .unwrap();
        assert_eq!(nodes_of(&p), vec!["special"]);
        let mem = Resources(std::iter::once(("memory".to_string(), 32 << 30)).collect());
        let p = place(&cluster, &[mem.clone(), mem.clone()], Strategy::Spread, &[]).unwrap();
        assert_eq!(nodes_of(&p), vec!["big", "big"]);
        // 96 GiB never fit a cluster of 64 GiB, though each 32 fits "big".
        assert_eq!(
            place(&cluster, &vec![mem.clone(); 3], Strategy::Pack, &[]),
            Err(PlaceError::Infeasible)
        );
        let mut full = cluster.clone();
        full[0].try_fit(&mem).unwrap();
        assert_eq!(
            place(&full, &vec![mem.clone(); 2], Strategy::Pack, &[]),
            Err(PlaceError::Busy)
        );
    }

    #[test]
    fn strict_spread_matching_beats_greedy() {
        // Bundle 0 fits both nodes, bundle 1 only "b": greedy would put 0 on b.
        let mut a = node("a", 1, 1.0);
        a.total.set(CPU, UNIT);
        let mut b = node("b", 2, 1.0);
        b.avail = b.total.clone();
        let cluster = vec![b, a];
        let p = place(&cluster, &[gpu(1.0), gpu(2.0)], Strategy::StrictSpread, &[]).unwrap();
        assert_eq!(nodes_of(&p), vec!["a", "b"]);
    }

    #[test]
    fn reschedule_respects_occupied_nodes() {
        let cluster = vec![node("a", 2, 4.0), node("b", 2, 4.0), node("c", 2, 4.0)];
        let occ = vec!["a".to_string()];
        let p = place(&cluster, &[gpu(1.0)], Strategy::StrictSpread, &occ).unwrap();
        assert_ne!(p[0].node_id, "a");
        let p = place(&cluster, &[gpu(1.0)], Strategy::Pack, &occ).unwrap();
        assert_eq!(p[0].node_id, "a");
        let p = place(&cluster, &[gpu(1.0)], Strategy::Spread, &occ).unwrap();
        assert_ne!(p[0].node_id, "a");
        let small = vec![node("a", 2, 4.0)];
        assert_eq!(
            place(&small, &[gpu(1.0)], Strategy::StrictSpread, &occ),
            Err(PlaceError::Infeasible)
        );
    }

    #[test]
    fn strategy_parsing() {
        assert_eq!(
            "STRICT_SPREAD".parse::<Strategy>().unwrap(),
            Strategy::StrictSpread
        );
        let e = "SIDEWAYS".parse::<Strategy>().unwrap_err().to_string();
        assert!(e.contains("unknown strategy 'SIDEWAYS'"), "{e}");
    }

    #[test]
    fn a_thousand_nodes_is_quick() {
        let cluster: Vec<NodeView> = (0..1000)
            .map(|i| node(&format!("n{i:04}"), 8, 64.0))
            .collect();
        let t = std::time::Instant::now();
        for s in [
            Strategy::Pack,
            Strategy::Spread,
            Strategy::StrictPack,
            Strategy::StrictSpread,
        ] {
            place(&cluster, &vec![gpu(1.0); 8], s, &[]).unwrap();
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
    }
}
