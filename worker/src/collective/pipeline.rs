//! Links between neighbouring pipeline stages: each rank of stage s sends
//! its step output to the rank with the same TP rank in stage s + 1 (every
//! rank of a stage holds the whole tensors after its all-reduces), over one
//! TCP connection per link, one way.
//!
//! Sends do not wait for the receiver to be ready (the socket buffers them),
//! so a stage can start its next step while the next stage still works on
//! this one. Every message carries the link's sequence number and the
//! tensors' shape, checked on arrival: a stage that got out of step with its
//! neighbour is an error, never silently mixed-up activations. As with the
//! tensor-parallel group, any failure breaks the link for good.
//!
//! Tensors travel as native-endian f32: both ends run the same build.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::tcp::{accept_before, dial, io_err, listen, read_u32, read_u64};
use crate::error::{Error, Result};

/// Opens a link ("FLTP"), so a stray client on the port is told apart.
const MAGIC: u32 = 0x464c_5450;

/// One stage's ends of its pipeline links.
pub trait StageLink: Send + Sync {
    /// Sends this step's output (`hidden` and `residual`, [rows, cols] each)
    /// to the next stage.
    fn send(&self, hidden: &[f32], residual: &[f32], rows: usize, cols: usize) -> Result<()>;
    /// Receives the previous stage's output for this step, which must be
    /// [rows, cols]: (hidden, residual).
    fn recv(&self, rows: usize, cols: usize) -> Result<(Vec<f32>, Vec<f32>)>;
}

struct End {
    stream: TcpStream,
    seq: u64,
}

enum Link {
    Open(End),
    Broken(String),
}

pub struct TcpStageLink {
    prev: Option<Mutex<Link>>,
    next: Option<Mutex<Link>>,
}

impl TcpStageLink {
    /// Opens this rank's links: listens at `recv_address` for the previous
    /// stage (a stage after the first), then dials the next stage at
    /// `send_address` (a stage before the last). Set-up waits up to
    /// `setup_timeout`; each later receive waits up to `step_timeout` (the
    /// previous stage's step time), each send up to `setup_timeout`.
    pub fn connect(
        recv_address: Option<&str>,
        send_address: Option<&str>,
        setup_timeout: Duration,
        step_timeout: Duration,
    ) -> Result<Self> {
        let prev = match recv_address {
            Some(addr) => {
                let s = accept_prev(addr, setup_timeout)?;
                s.set_read_timeout(Some(step_timeout))
                    .map_err(|e| io_err("pipeline link", None, e))?;
                Some(Mutex::new(Link::Open(End { stream: s, seq: 0 })))
            }
            None => None,
        };
        let next = match send_address {
            Some(addr) => {
                let s = dial_next(addr, setup_timeout)?;
                Some(Mutex::new(Link::Open(End { stream: s, seq: 0 })))
            }
            None => None,
        };
        Ok(Self { prev, next })
    }
}

fn accept_prev(address: &str, timeout: Duration) -> Result<TcpStream> {
    const OP: &str = "pipeline link";
    let listener = listen(OP, address)?;
    let deadline = Instant::now() + timeout;
    loop {
        let Some((mut s, from)) = accept_before(OP, &listener, deadline, timeout)? else {
            return Err(io_err(
                OP,
                None,
                format!(
                    "the previous pipeline stage did not connect to {address} within {timeout:?} (VLLM_RPC_TIMEOUT)"
                ),
            ));
        };
        match read_u32(&mut s) {
            Ok(MAGIC) => return Ok(s),
            // Not one of ours (a port scanner, a stale client): ignore it.
            _ => tracing::debug!("ignored a stray connection from {from}"),
        }
    }
}

fn dial_next(address: &str, timeout: Duration) -> Result<TcpStream> {
    const OP: &str = "pipeline link";
    // The next stage may not listen yet: `dial` retries until the deadline.
    let mut s = dial(OP, address, "the next pipeline stage", None, timeout)?;
    s.write_all(&MAGIC.to_le_bytes())
        .map_err(|e| io_err(OP, None, e))?;
    Ok(s)
}

/// Runs `f` on an open link; any error breaks it for good.
fn with_link<T>(
    link: Option<&Mutex<Link>>,
    op: &'static str,
    missing: &str,
    f: impl FnOnce(&mut End) -> Result<T>,
) -> Result<T> {
    let link = link.ok_or_else(|| Error::config(missing.to_string()))?;
    let mut link = link
        .lock()
        .map_err(|_| io_err(op, None, "the link's lock is poisoned"))?;
    let end = match &mut *link {
        Link::Open(end) => end,
        Link::Broken(why) => {
            return Err(io_err(
                op,
                None,
                format!("the link is broken by an earlier failure ({why})"),
            ))
        }
    };
    let r = f(end);
    if let Err(e) = &r {
        *link = Link::Broken(e.to_string());
    }
    r
}

impl StageLink for TcpStageLink {
    fn send(&self, hidden: &[f32], residual: &[f32], rows: usize, cols: usize) -> Result<()> {
        const OP: &str = "pipeline send";
        with_link(
            self.next.as_ref(),
            OP,
            "the last pipeline stage has no next stage",
            |end| {
                let n = rows * cols;
                if hidden.len() != n || residual.len() != n {
                    return Err(Error::config(format!(
                        "pipeline send: [{rows}, {cols}] tensors hold {n} values, got {} and {}",
                        hidden.len(),
                        residual.len()
                    )));
                }
                let mut msg = Vec::with_capacity(28 + 8 * n);
                msg.extend_from_slice(&MAGIC.to_le_bytes());
                for v in [end.seq, rows as u64, cols as u64] {
                    msg.extend_from_slice(&v.to_le_bytes());
                }
                msg.extend_from_slice(bytemuck::cast_slice(hidden));
                msg.extend_from_slice(bytemuck::cast_slice(residual));
                end.stream
                    .write_all(&msg)
                    .map_err(|e| io_err(OP, None, format!("to the next stage: {e}")))?;
                end.seq += 1;
                Ok(())
            },
        )
    }

    fn recv(&self, rows: usize, cols: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        const OP: &str = "pipeline receive";
        with_link(
            self.prev.as_ref(),
            OP,
            "the first pipeline stage has no previous stage",
            |end| {
                let s = &mut end.stream;
                let err =
                    |e: std::io::Error| io_err(OP, None, format!("from the previous stage: {e}"));
                let magic = read_u32(s).map_err(err)?;
                let (seq, r, c) = (
                    read_u64(s).map_err(err)?,
                    read_u64(s).map_err(err)? as usize,
                    read_u64(s).map_err(err)? as usize,
                );
                if magic != MAGIC || seq != end.seq || r != rows || c != cols {
                    return Err(io_err(
                    OP,
                    None,
                    format!(
                        "out of step with the previous stage: expected message {} of [{rows}, {cols}], got message {seq} of [{r}, {c}]",
                        end.seq
                    ),
                ));
                }
                let mut read = |n: usize| -> Result<Vec<f32>> {
                    let mut v = vec![0f32; n];
                    s.read_exact(bytemuck::cast_slice_mut(&mut v))
                        .map_err(err)?;
                    Ok(v)
                };
                let hidden = read(rows * cols)?;
                let residual = read(rows * cols)?;
                end.seq += 1;
                Ok((hidden, residual))
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_address() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    const T: Duration = Duration::from_secs(5);

    /// A chain of `n` stages on loopback; returns each stage's link.
    fn chain(n: usize) -> Vec<TcpStageLink> {
        let addrs: Vec<String> = (0..n).map(|_| free_address()).collect();
        let handles: Vec<_> = (0..n)
            .map(|s| {
                let recv = (s > 0).then(|| addrs[s].clone());
                let send = (s + 1 < n).then(|| addrs[s + 1].clone());
                std::thread::spawn(move || {
                    TcpStageLink::connect(recv.as_deref(), send.as_deref(), T, T).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn tensors_cross_stages_in_order() {
        let links = chain(3);
        let (rows, cols) = (3, 4);
        // The first stage sends two steps before anyone receives: sends do not wait.
        for step in 0..2 {
            let h: Vec<f32> = (0..12).map(|i| (step * 100 + i) as f32).collect();
            let r: Vec<f32> = h.iter().map(|x| -x).collect();
            links[0].send(&h, &r, rows, cols).unwrap();
        }
        for step in 0..2 {
            let (h, r) = links[1].recv(rows, cols).unwrap();
            assert_eq!(h[5], (step * 100 + 5) as f32);
            assert_eq!(r[5], -h[5]);
            links[1].send(&h, &r, rows, cols).unwrap();
            let (h2, r2) = links[2].recv(rows, cols).unwrap();
            assert_eq!((h2, r2), (h, r));
        }
        assert!(
            links[0].recv(1, 1).is_err(),
            "the first stage has no previous stage"
        );
        assert!(links[2].send(&[0.0], &[0.0], 1, 1).is_err());
    }

    #[test]
    fn a_shape_mismatch_breaks_the_link() {
        let links = chain(2);
        links[0].send(&[1.0; 4], &[2.0; 4], 2, 2).unwrap();
        let e = links[1].recv(4, 1).unwrap_err();
        assert!(e.is_fatal());
        assert!(e.to_string().contains("out of step"), "{e}");
        assert!(links[1]
            .recv(2, 2)
            .unwrap_err()
            .to_string()
            .contains("broken"));
    }

    #[test]
    fn a_dead_previous_stage_is_an_error_not_a_hang() {
        let mut links = chain(2);
        let first = links.remove(0);
        drop(first);
        let started = Instant::now();
        assert!(links[0].recv(1, 1).unwrap_err().is_fatal());
        assert!(started.elapsed() < T);
        // Nobody listening at all: set-up gives up after its timeout.
        let addr = free_address();
        let e = TcpStageLink::connect(Some(&addr), None, Duration::from_millis(200), T);
        assert!(e.err().unwrap().to_string().contains("did not connect"));
    }
}
