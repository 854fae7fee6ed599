//! Fixed-point resource amounts: 1 unit = 1/10000 of a resource, so that
//! fractional GPUs add up exactly (0.5 + 0.5 == 1).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const UNIT: u64 = 10_000;
pub const GPU: &str = "GPU";
pub const CPU: &str = "CPU";
pub const MEMORY: &str = "memory";
/// Ray's per-node resource: every node offers `node:<its ip>` = 1, so a
/// request for a sliver of it (vLLM asks 0.001) lands on that node.
pub const NODE_PREFIX: &str = "node:";

pub fn node_resource(ip: &str) -> String {
    format!("{NODE_PREFIX}{ip}")
}

/// Resource name -> amount in fixed point units.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Resources(pub BTreeMap<String, u64>);

impl Resources {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0)
    }

    pub fn set(&mut self, name: &str, amount: u64) {
        if amount == 0 {
            self.0.remove(name);
        } else {
            self.0.insert(name.to_string(), amount);
        }
    }

    pub fn with(mut self, name: &str, amount: f64) -> Self {
        self.set(name, to_fixed(amount));
        self
    }

    pub fn is_empty(&self) -> bool {
        self.0.values().all(|v| *v == 0)
    }

    /// True when every amount in `self` is available in `avail`.
    pub fn fits_in(&self, avail: &Resources) -> bool {
        self.0.iter().all(|(k, v)| avail.get(k) >= *v)
    }

    pub fn add(&mut self, other: &Resources) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_insert(0) += v;
        }
    }

    /// Saturating: usage recorded by an older head may exceed a node that came
    /// back smaller, and that must not wrap around.
    pub fn sub(&mut self, other: &Resources) {
        for (k, v) in &other.0 {
            if let Some(x) = self.0.get_mut(k) {
                *x = x.saturating_sub(*v);
            }
        }
    }

    /// Ray-like rendering for error messages and status: `{"CPU": 1.0, "GPU": 0.5}`.
    pub fn shape(&self) -> String {
        let parts: Vec<String> = self
            .0
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("\"{k}\": {}", fmt_amount(*v)))
            .collect();
        format!("{{{}}}", parts.join(", "))
    }

    /// Parses a JSON object such as `{"GPU": 0.5, "CPU": 1}`.
    pub fn from_json_value(what: &str, v: &serde_json::Value) -> Result<Self> {
        let obj = v
            .as_object()
            .ok_or_else(|| Error::invalid(what, format!("expected a JSON object, got {v}")))?;
        let mut r = Resources::new();
        for (k, val) in obj {
            if k.is_empty() {
                return Err(Error::invalid(what, "empty resource name"));
            }
            let x = val.as_f64().ok_or_else(|| {
                Error::invalid(what, format!("resource '{k}' must be a number, got {val}"))
            })?;
            if !x.is_finite() || x < 0.0 {
                return Err(Error::invalid(
                    what,
                    format!("resource '{k}' must be a finite number >= 0, got {x}"),
                ));
            }
            if x > 1e15 {
                return Err(Error::invalid(
                    what,
                    format!("resource '{k}' is too large: {x}"),
                ));
            }
            let fixed = to_fixed(x);
            if x > 0.0 && fixed == 0 {
                return Err(Error::invalid(
                    what,
                    format!("resource '{k}' is below the 0.0001 resolution: {x}"),
                ));
            }
            if k == GPU && fixed > UNIT && !fixed.is_multiple_of(UNIT) {
                return Err(Error::invalid(
                    what,
                    format!("GPU amounts above 1 must be whole numbers, got {x}"),
                ));
            }
            r.set(k, fixed);
        }
        Ok(r)
    }

    pub fn from_json_str(what: &str, s: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(s)
            .map_err(|e| Error::invalid(what, format!("malformed JSON: {e}")))?;
        Self::from_json_value(what, &v)
    }
}

pub fn to_fixed(x: f64) -> u64 {
    (x * UNIT as f64).round() as u64
}

pub fn to_float(x: u64) -> f64 {
    x as f64 / UNIT as f64
}

/// `1.0`, `0.5`, `0.3333` — always one decimal at least, as Ray prints.
pub fn fmt_amount(x: u64) -> String {
    let f = to_float(x);
    if x.is_multiple_of(UNIT) {
        format!("{f:.1}")
    } else {
        let s = format!("{f:.4}");
        s.trim_end_matches('0').to_string()
    }
}

/// Parses a list of bundles: `[{"GPU": 1}, {"GPU": 1, "CPU": 2}]`.
pub fn parse_bundles(s: &str) -> Result<Vec<Resources>> {
    let v: serde_json::Value = serde_json::from_str(s)
        .map_err(|e| Error::invalid("bundles", format!("malformed JSON: {e}")))?;
    let arr = v
        .as_array()
        .ok_or_else(|| Error::invalid("bundles", "expected a JSON list of objects"))?;
    if arr.is_empty() {
        return Err(Error::invalid("bundles", "at least one bundle is required"));
    }
    let mut out = Vec::with_capacity(arr.len());
    for (i, b) in arr.iter().enumerate() {
        let r = Resources::from_json_value(&format!("bundle {i}"), b)?;
        if r.is_empty() {
            return Err(Error::invalid(
                format!("bundle {i}"),
                "a bundle must ask for at least one resource",
            ));
        }
        out.push(r);
    }
    Ok(out)
}

/// Bytes in the units Ray's status uses (`31.18GiB`, `0B`).
pub fn fmt_bytes(b: f64) -> String {
    if b <= 0.0 {
        return "0B".to_string();
    }
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b;
    let mut i = 0;
    while x >= 1024.0 && i + 1 < units.len() {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{x:.0}B")
    } else {
        format!("{x:.2}{}", units[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_add_up_exactly() {
        let a = Resources::new().with(GPU, 0.5);
        let mut t = Resources::new();
        t.add(&a);
        t.add(&a);
        assert_eq!(t.get(GPU), UNIT);
        let third = to_fixed(1.0 / 3.0);
        assert_eq!(third, 3333);
    }

    #[test]
    fn parse_rejects_bad_input() {
        let cases = [
            ("{\"GPU\": -1}", "must be a finite number >= 0"),
            ("{\"GPU\": \"x\"}", "must be a number"),
            ("{\"GPU\": 1.5}", "whole numbers"),
            ("{\"GPU\": 0.00001}", "resolution"),
            ("[1]", "expected a JSON object"),
            ("{", "malformed JSON"),
        ];
        for (input, want) in cases {
            let e = Resources::from_json_str("resources", input)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{input}: {e}");
        }
        assert!(parse_bundles("[]").is_err());
        assert!(parse_bundles("[{}]")
            .unwrap_err()
            .to_string()
            .contains("bundle 0"));
        assert!(parse_bundles("{\"GPU\":1}").is_err());
        let b = parse_bundles("[{\"GPU\": 0.5, \"CPU\": 2, \"acc\": 1}]").unwrap();
        assert_eq!(b[0].get(GPU), 5000);
        assert_eq!(b[0].get("acc"), UNIT);
    }

    #[test]
    fn node_resource_pins_a_bundle_to_its_node() {
        use crate::placement::{place, NodeView, Strategy};
        let node = |id: &str, ip: &str| {
            let total = Resources::new()
                .with(CPU, 4.0)
                .with(&node_resource(ip), 1.0);
            NodeView::idle(id, total, vec![])
        };
        assert_eq!(node_resource("10.0.0.7"), "node:10.0.0.7");
        // "b" is the tighter fit, so PACK would go there without the pin.
        let mut b = node("b", "10.0.0.2");
        b.avail.set(CPU, UNIT * 2);
        let cluster = vec![node("a", "10.0.0.1"), b];
        let bundles = parse_bundles(r#"[{"CPU": 1, "node:10.0.0.1": 0.001}, {"CPU": 1}]"#).unwrap();
        assert_eq!(bundles[0].get("node:10.0.0.1"), 10);
        let p = place(&cluster, &bundles, Strategy::Pack, &[]).unwrap();
        assert_eq!(p[0].node_id, "a");
        let unpinned = place(&cluster, &bundles[1..], Strategy::Pack, &[]).unwrap();
        assert_eq!(unpinned[0].node_id, "b");
        // A node that is not in the cluster: nothing can ever hold it.
        let away = parse_bundles(r#"[{"CPU": 1, "node:10.0.0.9": 0.001}]"#).unwrap();
        assert_eq!(
            place(&cluster, &away, Strategy::Pack, &[]),
            Err(crate::placement::PlaceError::Infeasible)
        );
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_amount(UNIT * 4), "4.0");
        assert_eq!(fmt_amount(5000), "0.5");
        assert_eq!(fmt_amount(3333), "0.3333");
        assert_eq!(fmt_bytes(0.0), "0B");
        assert_eq!(fmt_bytes(1536.0 * 1024.0 * 1024.0), "1.50GiB");
        let r = Resources::new().with(GPU, 0.5).with(CPU, 1.0);
        assert_eq!(r.shape(), "{\"CPU\": 1.0, \"GPU\": 0.5}");
    }
}
