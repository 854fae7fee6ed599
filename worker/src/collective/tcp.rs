//! A `HostGroup` over TCP between worker processes: a star around rank 0.
//!
//! Ranks meet at rank 0's address (rank 0 listens, the others dial it and
//! say who they are). An all-reduce sends every buffer to rank 0, which sums
//! them in rank order and sends the one result back, so every rank holds the
//! same bits whatever the arrival order. All-gather works the same way with
//! per-rank lengths. Every socket read and write is bounded by the group's
//! timeout (`VLLM_RPC_TIMEOUT`): a dead or stuck peer is an error, never a
//! hang, and after one failure the group refuses further work.
//!
//! Buffers travel as native-endian f32: ranks of one group run the same
//! build on the same kind of machine.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::HostGroup;
use crate::error::{Error, Result};

/// Opens every connection, so a stray client on the port is told apart.
const MAGIC: u32 = 0x464c_5447; // "FLTG"
const OP_ALL_REDUCE: u8 = 1;
const OP_ALL_GATHER: u8 = 2;
const STATUS_OK: u8 = 0;
const STATUS_MISMATCH: u8 = 1;

pub struct TcpGroup {
    rank: usize,
    size: usize,
    links: Mutex<Links>,
}

enum Links {
    /// Rank 0: one stream per other rank, index r - 1 for rank r.
    Root(Vec<TcpStream>),
    Leaf(TcpStream),
    /// A collective failed; the streams are in an unknown state.
    Broken(String),
}

pub(super) fn io_err(op: &'static str, peer: Option<usize>, e: impl std::fmt::Display) -> Error {
    Error::Collective {
        op,
        peer: peer.map(|p| format!(", peer rank {p}")).unwrap_or_default(),
        msg: e.to_string(),
    }
}

pub(super) fn configure(s: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))
}

pub(super) fn read_u32(s: &mut TcpStream) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

pub(super) fn read_u64(s: &mut TcpStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_u8(s: &mut TcpStream) -> std::io::Result<u8> {
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(b[0])
}

fn header(op: u8, len: usize) -> [u8; 9] {
    let mut h = [0u8; 9];
    h[0] = op;
    h[1..].copy_from_slice(&(len as u64).to_le_bytes());
    h
}

impl TcpGroup {
    /// Joins the group of `size` ranks meeting at `address` (rank 0 listens
    /// there). Returns once every rank has joined, or fails after `timeout`.
    pub fn rendezvous(address: &str, rank: usize, size: usize, timeout: Duration) -> Result<Self> {
        if size == 0 || rank >= size {
            return Err(Error::config(format!(
                "collective group: rank {rank} is outside a group of {size}"
            )));
        }
        let links = if size == 1 {
            Links::Root(Vec::new())
        } else if rank == 0 {
            Links::Root(accept_peers(address, size, timeout)?)
        } else {
            Links::Leaf(dial_root(address, rank, size, timeout)?)
        };
        tracing::debug!("rank {rank} joined the collective group of {size} at {address}");
        Ok(Self {
            rank,
            size,
            links: Mutex::new(links),
        })
    }

    /// Runs `f` on the links; any error breaks the group for good.
    fn with_links<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Links) -> Result<T>,
    ) -> Result<T> {
        let mut links = self
            .links
            .lock()
            .map_err(|_| io_err(op, None, "the group's lock is poisoned"))?;
        if let Links::Broken(why) = &*links {
            return Err(io_err(
                op,
                None,
                format!("the group is broken by an earlier failure ({why})"),
            ));
        }
        let r = f(&mut links);
        if let Err(e) = &r {
            *links = Links::Broken(e.to_string());
        }
        r
    }
}

fn accept_peers(address: &str, size: usize, timeout: Duration) -> Result<Vec<TcpStream>> {
    const OP: &str = "rendezvous";
    let listener = listen(OP, address)?;
    let deadline = Instant::now() + timeout;
    let mut peers: Vec<Option<TcpStream>> = (1..size).map(|_| None).collect();
    while peers.iter().any(Option::is_none) {
        let Some((mut s, from)) = accept_before(OP, &listener, deadline, timeout)? else {
            let joined = peers.iter().filter(|p| p.is_some()).count() + 1;
            return Err(io_err(
                OP,
                None,
                format!(
                    "only {joined} of {size} ranks joined at {address} within {timeout:?} (VLLM_RPC_TIMEOUT)"
                ),
            ));
        };
        let hello = (|| -> std::io::Result<(u32, u32, u32)> {
            Ok((read_u32(&mut s)?, read_u32(&mut s)?, read_u32(&mut s)?))
        })();
        match hello {
            Ok((MAGIC, r, n)) if n as usize == size && r >= 1 && (r as usize) < size => {
                let slot = &mut peers[r as usize - 1];
                if slot.is_some() {
                    return Err(io_err(OP, Some(r as usize), "rank joined twice"));
                }
                *slot = Some(s);
            }
            Ok((MAGIC, r, n)) => {
                return Err(io_err(
                    OP,
                    None,
                    format!("rank {r} of a group of {n} joined a group of {size}"),
                ))
            }
            // Not one of ours (a port scanner, a stale client): ignore it.
            Ok(_) | Err(_) => tracing::debug!("ignored a stray connection from {from}"),
        }
    }
    let mut peers: Vec<TcpStream> = peers.into_iter().flatten().collect();
    // Tell everyone the group is complete.
    for (i, p) in peers.iter_mut().enumerate() {
        p.write_all(&[STATUS_OK])
            .map_err(|e| io_err(OP, Some(i + 1), e))?;
    }
    Ok(peers)
}

fn dial_root(address: &str, rank: usize, size: usize, timeout: Duration) -> Result<TcpStream> {
    const OP: &str = "rendezvous";
    // Rank 0 may not listen yet: `dial` retries until the deadline.
    let mut s = dial(OP, address, "rank 0", Some(0), timeout)?;
    let mut hello = Vec::with_capacity(12);
    for v in [MAGIC, rank as u32, size as u32] {
        hello.extend_from_slice(&v.to_le_bytes());
    }
    s.write_all(&hello).map_err(|e| io_err(OP, Some(0), e))?;
    match read_u8(&mut s) {
        Ok(STATUS_OK) => Ok(s),
        Ok(other) => Err(io_err(OP, Some(0), format!("unexpected reply {other}"))),
        Err(e) => Err(io_err(
            OP,
            Some(0),
            format!("the group did not complete: {e}"),
        )),
    }
}

/// Listens at `address`, polled (std has no accept timeout) so that waits
/// for peers have a deadline.
pub(super) fn listen(op: &'static str, address: &str) -> Result<TcpListener> {
    let listener = TcpListener::bind(address)
        .map_err(|e| io_err(op, None, format!("cannot listen on {address}: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io_err(op, None, e))?;
    Ok(listener)
}

/// The next connection before `deadline` (blocking, configured with
/// `timeout`), or `None` once the deadline has passed.
pub(super) fn accept_before(
    op: &'static str,
    listener: &TcpListener,
    deadline: Instant,
    timeout: Duration,
) -> Result<Option<(TcpStream, SocketAddr)>> {
    loop {
        match listener.accept() {
            Ok((s, from)) => {
                s.set_nonblocking(false).map_err(|e| io_err(op, None, e))?;
                configure(&s, timeout).map_err(|e| io_err(op, None, e))?;
                return Ok(Some((s, from)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(io_err(op, None, e)),
        }
    }
}

/// Connects to `address`, retrying until `timeout` (the peer may not listen
/// yet); `what` names the peer in the error.
pub(super) fn dial(
    op: &'static str,
    address: &str,
    what: &str,
    peer: Option<usize>,
    timeout: Duration,
) -> Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    let addr: SocketAddr = address
        .to_socket_addrs()
        .map_err(|e| io_err(op, None, format!("bad address {address}: {e}")))?
        .next()
        .ok_or_else(|| io_err(op, None, format!("{address} resolves to nothing")))?;
    let s = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(&addr, left.max(Duration::from_millis(10))) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(io_err(
                    op,
                    peer,
                    format!(
                    "cannot reach {what} at {address} within {timeout:?} (VLLM_RPC_TIMEOUT): {e}"
                ),
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    configure(&s, timeout).map_err(|e| io_err(op, peer, e))?;
    Ok(s)
}

/// Reads one peer's `(op, len)` header and checks the op.
fn read_header(s: &mut TcpStream, op: u8) -> std::io::Result<usize> {
    let got = read_u8(s)?;
    let len = read_u64(s)? as usize;
    if got != op {
        return Err(std::io::Error::other(format!(
            "peer is in collective {got}, this rank in {op}: the ranks ran different steps"
        )));
    }
    Ok(len)
}

impl HostGroup for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        const OP: &str = "all_reduce";
        if self.size == 1 {
            return Ok(());
        }
        self.with_links(OP, |links| match links {
            Links::Root(peers) => {
                let mut scratch = vec![0f32; buf.len()];
                let mut mismatch = None;
                for (i, p) in peers.iter_mut().enumerate() {
                    let len =
                        read_header(p, OP_ALL_REDUCE).map_err(|e| io_err(OP, Some(i + 1), e))?;
                    if len != buf.len() {
                        // Drain it so the stream stays in step, then fail everyone.
                        let mut junk = vec![0u8; len * 4];
                        p.read_exact(&mut junk)
                            .map_err(|e| io_err(OP, Some(i + 1), e))?;
                        mismatch = Some((i + 1, len));
                        continue;
                    }
                    p.read_exact(bytemuck::cast_slice_mut(&mut scratch))
                        .map_err(|e| io_err(OP, Some(i + 1), e))?;
                    // Rank order, one sum for all: identical bits everywhere.
                    for (a, b) in buf.iter_mut().zip(&scratch) {
                        *a += *b;
                    }
                }
                let status = if mismatch.is_some() {
                    STATUS_MISMATCH
                } else {
                    STATUS_OK
                };
                for (i, p) in peers.iter_mut().enumerate() {
                    p.write_all(&header(status, buf.len()))
                        .and_then(|_| {
                            if status == STATUS_OK {
                                p.write_all(bytemuck::cast_slice(buf))
                            } else {
                                Ok(())
                            }
                        })
                        .map_err(|e| io_err(OP, Some(i + 1), e))?;
                }
                match mismatch {
                    Some((r, len)) => Err(io_err(
                        OP,
                        Some(r),
                        format!("buffer of {len} elements, rank 0 has {}", buf.len()),
                    )),
                    None => Ok(()),
                }
            }
            Links::Leaf(root) => {
                root.write_all(&header(OP_ALL_REDUCE, buf.len()))
                    .and_then(|_| root.write_all(bytemuck::cast_slice(buf)))
                    .map_err(|e| io_err(OP, Some(0), e))?;
                let status = read_u8(root).map_err(|e| io_err(OP, Some(0), e))?;
                let len = read_u64(root).map_err(|e| io_err(OP, Some(0), e))? as usize;
                if status != STATUS_OK || len != buf.len() {
                    return Err(io_err(
                        OP,
                        Some(0),
                        "ranks passed buffers of different lengths",
                    ));
                }
                root.read_exact(bytemuck::cast_slice_mut(buf))
                    .map_err(|e| io_err(OP, Some(0), e))
            }
            Links::Broken(_) => unreachable!("checked by with_links"),
        })
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<Vec<f32>>> {
        const OP: &str = "all_gather";
        if self.size == 1 {
            return Ok(vec![local.to_vec()]);
        }
        self.with_links(OP, |links| match links {
            Links::Root(peers) => {
                let mut parts = Vec::with_capacity(self.size);
                parts.push(local.to_vec());
                for (i, p) in peers.iter_mut().enumerate() {
                    let len =
                        read_header(p, OP_ALL_GATHER).map_err(|e| io_err(OP, Some(i + 1), e))?;
                    let mut v = vec![0f32; len];
                    p.read_exact(bytemuck::cast_slice_mut(&mut v))
                        .map_err(|e| io_err(OP, Some(i + 1), e))?;
                    parts.push(v);
                }
                let mut lens = Vec::with_capacity(8 * parts.len());
                for part in &parts {
                    lens.extend_from_slice(&(part.len() as u64).to_le_bytes());
                }
                for (i, p) in peers.iter_mut().enumerate() {
                    let sent = (|| {
                        p.write_all(&lens)?;
                        for part in &parts {
                            p.write_all(bytemuck::cast_slice(part))?;
                        }
                        Ok::<_, std::io::Error>(())
                    })();
                    sent.map_err(|e| io_err(OP, Some(i + 1), e))?;
                }
                Ok(parts)
            }
            Links::Leaf(root) => {
                root.write_all(&header(OP_ALL_GATHER, local.len()))
                    .and_then(|_| root.write_all(bytemuck::cast_slice(local)))
                    .map_err(|e| io_err(OP, Some(0), e))?;
                let mut lens = Vec::with_capacity(self.size);
                for _ in 0..self.size {
                    lens.push(read_u64(root).map_err(|e| io_err(OP, Some(0), e))? as usize);
                }
                let mut parts = Vec::with_capacity(self.size);
                for len in lens {
                    let mut v = vec![0f32; len];
                    root.read_exact(bytemuck::cast_slice_mut(&mut v))
                        .map_err(|e| io_err(OP, Some(0), e))?;
                    parts.push(v);
                }
                Ok(parts)
            }
            Links::Broken(_) => unreachable!("checked by with_links"),
        })
    }
}

#[cfg(test)]
mod tests_support {
    use std::sync::Arc;

    use super::*;

    pub fn free_address() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    /// Runs `f(rank, group)` on `n` threads, one group member each.
    pub fn on_ranks<T: Send + 'static>(
        n: usize,
        timeout: Duration,
        f: impl Fn(usize, TcpGroup) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let addr = free_address();
        let f = Arc::new(f);
        let handles: Vec<_> = (0..n)
            .map(|r| {
                let (addr, f) = (addr.clone(), f.clone());
                std::thread::spawn(move || {
                    let g = TcpGroup::rendezvous(&addr, r, n, timeout).unwrap();
                    f(r, g)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::{free_address, on_ranks};
    use super::*;

    #[test]
    fn all_reduce_gives_every_rank_the_same_bits() {
        let results = on_ranks(3, Duration::from_secs(10), |r, g| {
            assert_eq!((g.rank(), g.size()), (r, 3));
            // Values whose sum depends on the order it is taken in.
            let mut buf: Vec<f32> = (0..1000)
                .map(|i| ((i * 7919 + r * 104729) % 1000) as f32 * 1e-3 + (r as f32) * 1e7)
                .collect();
            g.all_reduce_sum(&mut buf).unwrap();
            // Twice, so a second collective on the same links works too.
            let mut again = vec![r as f32 + 0.5; 3];
            g.all_reduce_sum(&mut again).unwrap();
            assert_eq!(again, vec![4.5; 3]);
            buf
        });
        let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&results[0]), bits(&results[1]));
        assert_eq!(bits(&results[0]), bits(&results[2]));
        // The sum is rank 0 + rank 1 + rank 2, in that order.
        let inputs: Vec<Vec<f32>> = (0..3)
            .map(|r: usize| {
                (0..1000)
                    .map(|i: usize| {
                        ((i * 7919 + r * 104729) % 1000) as f32 * 1e-3 + (r as f32) * 1e7
                    })
                    .collect()
            })
            .collect();
        for i in 0..1000 {
            assert_eq!(results[0][i], inputs[0][i] + inputs[1][i] + inputs[2][i]);
        }
    }

    #[test]
    fn all_gather_keeps_rank_order_and_unequal_lengths() {
        let results = on_ranks(3, Duration::from_secs(10), |r, g| {
            let local: Vec<f32> = (0..(5 - r)).map(|i| (r * 100 + i) as f32).collect();
            g.all_gather(&local).unwrap()
        });
        let expected: Vec<Vec<f32>> = (0..3)
            .map(|r| (0..(5 - r)).map(|i| (r * 100 + i) as f32).collect())
            .collect();
        for parts in results {
            assert_eq!(parts, expected);
        }
    }

    #[test]
    fn a_missing_or_dead_peer_is_an_error_not_a_hang() {
        // Rank 1 of 2 never comes: rank 0's rendezvous times out.
        let addr = free_address();
        let started = Instant::now();
        let e = TcpGroup::rendezvous(&addr, 0, 2, Duration::from_millis(300))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("only 1 of 2 ranks joined"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));

        // Rank 1 joins, then goes away: rank 0's all-reduce fails, and the
        // group stays failed.
        let results = on_ranks(2, Duration::from_millis(500), |r, g| {
            if r == 1 {
                drop(g);
                return None;
            }
            let mut buf = vec![1.0f32; 4];
            let first = g.all_reduce_sum(&mut buf).err().unwrap();
            let second = g.all_gather(&buf).err().unwrap();
            Some((first.to_string(), second.to_string(), first.is_fatal()))
        });
        let (first, second, fatal) = results[0].clone().unwrap();
        assert!(
            first.contains("all_reduce") && first.contains("peer rank 1"),
            "{first}"
        );
        assert!(second.contains("broken"), "{second}");
        assert!(fatal);

        // A peer that stays connected but never answers: the read times out.
        let results = on_ranks(2, Duration::from_millis(300), |r, g| {
            if r == 1 {
                std::thread::sleep(Duration::from_millis(1500));
                return None;
            }
            let t = Instant::now();
            let e = g.all_reduce_sum(&mut [1.0]).err().unwrap().to_string();
            Some((e, t.elapsed()))
        });
        let (e, took) = results[0].clone().unwrap();
        assert!(e.contains("peer rank 1"), "{e}");
        assert!(took < Duration::from_millis(1400), "{took:?}");
    }

    #[test]
    fn mismatched_lengths_fail_on_every_rank() {
        let results = on_ranks(2, Duration::from_secs(5), |r, g| {
            let mut buf = vec![1.0f32; 3 + r];
            g.all_reduce_sum(&mut buf).is_err()
        });
        assert_eq!(results, vec![true, true]);
    }
}

#[cfg(test)]
mod bench {
    use super::tests_support::on_ranks;
    use super::*;

    /// `cargo test -p flotilla-worker --lib collective -- --ignored --nocapture`:
    /// latency of one all-reduce of a SmolLM2 hidden row (576 f32) and of a
    /// 32-row batch at TP 3 (threads in one process, loopback TCP).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn all_reduce_latency_tp3() {
        for len in [576usize, 576 * 32] {
            let times = on_ranks(3, Duration::from_secs(10), move |_, g| {
                let mut buf = vec![1.0f32; len];
                for _ in 0..100 {
                    g.all_reduce_sum(&mut buf).unwrap();
                }
                let t = Instant::now();
                for _ in 0..2000 {
                    g.all_reduce_sum(&mut buf).unwrap();
                }
                t.elapsed() / 2000
            });
            eprintln!("all_reduce of {len} f32 at TP 3: {:?} per call", times[0]);
        }
    }
}
