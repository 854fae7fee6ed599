//! The engine's profiler (vLLM's `VLLM_TORCH_PROFILER_DIR`, `/start_profile`,
//! `/stop_profile`): between start and stop, every engine step records its
//! phases — scheduling, the model step on the executor, and applying the
//! result (sampled tokens, stop checks, detokenization) — with the step
//! number, request ids, batch size and token count. Stop writes them as
//! Chrome-trace JSON (what Perfetto and chrome://tracing open) into the
//! directory. Without the variable there is no profiler at all; while not
//! recording it costs one branch per phase.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum ProfilerError {
    #[error("the profiler is already recording (POST /stop_profile first)")]
    AlreadyRunning,
    #[error("the profiler is not recording (POST /start_profile first)")]
    NotRunning,
    #[error("cannot write the trace to {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One engine phase of one step.
pub struct Phase {
    pub name: &'static str,
    pub start: Instant,
    pub end: Instant,
    pub args: Value,
}

pub struct Profiler {
    dir: PathBuf,
    recording: Option<Recording>,
}

struct Recording {
    started: Instant,
    /// Wall-clock start, for the file name.
    started_unix_ms: u128,
    events: Vec<Value>,
}

impl Profiler {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            recording: None,
        }
    }

    pub fn is_recording(&self) -> bool {
        self.recording.is_some()
    }

    pub fn start(&mut self) -> Result<(), ProfilerError> {
        if self.recording.is_some() {
            return Err(ProfilerError::AlreadyRunning);
        }
        let started_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        self.recording = Some(Recording {
            started: Instant::now(),
            started_unix_ms,
            events: Vec::new(),
        });
        Ok(())
    }

    /// Records a phase while recording; nothing otherwise.
    pub fn record(&mut self, phase: Phase) {
        let Some(r) = &mut self.recording else {
            return;
        };
        let ts = phase
            .start
            .saturating_duration_since(r.started)
            .as_secs_f64()
            * 1e6;
        let dur = phase
            .end
            .saturating_duration_since(phase.start)
            .as_secs_f64()
            * 1e6;
        r.events.push(json!({
            "name": phase.name, "cat": "engine", "ph": "X",
            "ts": ts, "dur": dur, "pid": std::process::id(), "tid": 1,
            "args": phase.args,
        }));
    }

    /// Ends the recording and writes it; returns the file.
    pub fn stop(&mut self) -> Result<PathBuf, ProfilerError> {
        let r = self.recording.take().ok_or(ProfilerError::NotRunning)?;
        let path = self.dir.join(format!(
            "flotilla_trace_{}_{}.json",
            std::process::id(),
            r.started_unix_ms
        ));
        write_trace(&path, &r.events).map_err(|source| ProfilerError::Write {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }
}

fn write_trace(path: &Path, events: &[Value]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let doc = json!({
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"producer": "flotilla engine profiler"},
    });
    std::fs::write(
        path,
        serde_json::to_vec(&doc).map_err(std::io::Error::other)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_between_start_and_stop() {
        let dir = std::env::temp_dir().join(format!("flotilla-prof-{}", std::process::id()));
        let mut p = Profiler::new(&dir);
        let t = Instant::now();
        let phase = |name| Phase {
            name,
            start: t,
            end: t + std::time::Duration::from_micros(250),
            args: json!({"step": 1}),
        };
        p.record(phase("before"));
        assert!(matches!(p.stop(), Err(ProfilerError::NotRunning)));
        p.start().unwrap();
        assert!(matches!(p.start(), Err(ProfilerError::AlreadyRunning)));
        p.record(phase("execute_model"));
        let path = p.stop().unwrap();
        let doc: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let events = doc["traceEvents"].as_array().unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["name"], "execute_model");
        assert_eq!(events[0]["ph"], "X");
        assert!((events[0]["dur"].as_f64().unwrap() - 250.0).abs() < 1.0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
