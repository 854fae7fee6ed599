//! The engine's Prometheus metrics under vLLM's `vllm:` names, and the
//! periodic stats log line vLLM prints.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// Metric names as vLLM exposes them.
pub mod names {
    pub const NUM_REQUESTS_RUNNING: &str = "vllm:num_requests_running";
    pub const NUM_REQUESTS_WAITING: &str = "vllm:num_requests_waiting";
    pub const KV_CACHE_USAGE_PERC: &str = "vllm:kv_cache_usage_perc";
    pub const PREFIX_CACHE_QUERIES: &str = "vllm:prefix_cache_queries_total";
    pub const PREFIX_CACHE_HITS: &str = "vllm:prefix_cache_hits_total";
    pub const NUM_PREEMPTIONS: &str = "vllm:num_preemptions_total";
    pub const PROMPT_TOKENS: &str = "vllm:prompt_tokens_total";
    pub const GENERATION_TOKENS: &str = "vllm:generation_tokens_total";
    pub const REQUEST_SUCCESS: &str = "vllm:request_success_total";
    pub const TIME_TO_FIRST_TOKEN: &str = "vllm:time_to_first_token_seconds";
    pub const INTER_TOKEN_LATENCY: &str = "vllm:inter_token_latency_seconds";
    pub const E2E_REQUEST_LATENCY: &str = "vllm:e2e_request_latency_seconds";
}

/// vLLM's histogram buckets (seconds).
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
pub const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

const FINISH_REASONS: [&str; 3] = ["stop", "length", "abort"];

#[derive(Clone, Debug)]
pub struct Histogram {
    buckets: &'static [f64],
    /// Per bucket (not cumulative); the last slot is +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(buckets: &'static [f64]) -> Self {
        Self {
            buckets,
            counts: vec![0; buckets.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        let i = self
            .buckets
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.buckets.len());
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// Gauges and counters the scheduler owns, sampled at render time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SchedulerGauges {
    pub num_running: usize,
    pub num_waiting: usize,
    pub kv_cache_usage: f64,
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub num_preemptions: u64,
}

/// Counters and histograms fed by the engine loop as outputs go out.
#[derive(Clone, Debug)]
pub struct EngineMetrics {
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub request_success: [u64; 3],
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self {
            prompt_tokens: 0,
            generation_tokens: 0,
            request_success: [0; 3],
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
        }
    }
}

impl EngineMetrics {
    /// `reason` is the OpenAI `finish_reason` ("stop", "length", "abort"):
    /// metrics know labels, not the engine's types.
    pub fn record_finished(&mut self, reason: &str, e2e: Duration) {
        match FINISH_REASONS.iter().position(|r| *r == reason) {
            Some(i) => self.request_success[i] += 1,
            None => debug_assert!(false, "finish reason {reason:?} is not in FINISH_REASONS"),
        }
        self.e2e.observe(e2e.as_secs_f64());
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &str, v: f64) {
    let _ = writeln!(out, "{name}{{{labels}}} {v}");
}

fn histogram(out: &mut String, name: &str, help: &str, labels: &str, h: &Histogram) {
    header(out, name, "histogram", help);
    let mut cum = 0;
    for (i, b) in h.buckets.iter().enumerate() {
        cum += h.counts[i];
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b:?}\"}} {cum}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
}

/// Prometheus text exposition (format 0.0.4).
pub fn render(model_name: &str, g: &SchedulerGauges, m: &EngineMetrics) -> String {
    use names::*;
    let labels = format!("model_name=\"{}\"", escape_label(model_name));
    let mut out = String::new();
    let gauges: [(&str, &str, f64); 3] = [
        (
            NUM_REQUESTS_RUNNING,
            "Number of requests in model execution batches.",
            g.num_running as f64,
        ),
        (
            NUM_REQUESTS_WAITING,
            "Number of requests waiting to be processed.",
            g.num_waiting as f64,
        ),
        (
            KV_CACHE_USAGE_PERC,
            "KV-cache usage. 1 means 100 percent usage.",
            g.kv_cache_usage,
        ),
    ];
    for (name, help, v) in gauges {
        header(&mut out, name, "gauge", help);
        sample(&mut out, name, &labels, v);
    }
    let counters: [(&str, &str, u64); 5] = [
        (
            PREFIX_CACHE_QUERIES,
            "Prefix cache queries, in terms of number of queried tokens.",
            g.prefix_cache_queries,
        ),
        (
            PREFIX_CACHE_HITS,
            "Prefix cache hits, in terms of number of cached tokens.",
            g.prefix_cache_hits,
        ),
        (
            NUM_PREEMPTIONS,
            "Cumulative number of preemption from the engine.",
            g.num_preemptions,
        ),
        (
            PROMPT_TOKENS,
            "Number of prefill tokens processed.",
            m.prompt_tokens,
        ),
        (
            GENERATION_TOKENS,
            "Number of generation tokens processed.",
            m.generation_tokens,
        ),
    ];
    for (name, help, v) in counters {
        header(&mut out, name, "counter", help);
        sample(&mut out, name, &labels, v as f64);
    }
    header(
        &mut out,
        REQUEST_SUCCESS,
        "counter",
        "Count of successfully processed requests.",
    );
    for (reason, v) in FINISH_REASONS.iter().zip(m.request_success) {
        sample(
            &mut out,
            REQUEST_SUCCESS,
            &format!("{labels},finished_reason=\"{reason}\""),
            v as f64,
        );
    }
    histogram(
        &mut out,
        TIME_TO_FIRST_TOKEN,
        "Histogram of time to first token in seconds.",
        &labels,
        &m.ttft,
    );
    histogram(
        &mut out,
        INTER_TOKEN_LATENCY,
        "Histogram of inter-token latency in seconds.",
        &labels,
        &m.itl,
    );
    histogram(
        &mut out,
        E2E_REQUEST_LATENCY,
        "Histogram of e2e request latency in seconds.",
        &labels,
        &m.e2e,
    );
    out
}

/// vLLM's `VLLM_LOG_BATCHSIZE_INTERVAL` log (its forward context): every
/// forward pass's batch size in tokens and its time, and every interval
/// the sizes seen more than once with their count and median time, most
/// frequent first. Operators read it to pick CUDA graph capture sizes.
/// Like vLLM's, the counts cover the whole run, not the last interval.
#[derive(Debug)]
pub struct BatchSizeLogger {
    interval: Duration,
    last: Instant,
    /// Forward times in ms, by batch size in tokens.
    times: std::collections::BTreeMap<usize, Vec<f64>>,
}

impl BatchSizeLogger {
    /// From `VLLM_LOG_BATCHSIZE_INTERVAL` (seconds): `None` when negative (off).
    pub fn new(interval_secs: f64) -> Option<Self> {
        if interval_secs.is_nan() || interval_secs < 0.0 {
            return None;
        }
        Some(Self {
            interval: Duration::try_from_secs_f64(interval_secs).unwrap_or(Duration::MAX),
            last: Instant::now(),
            times: Default::default(),
        })
    }

    /// Records one forward pass and returns the log line when the interval
    /// has passed and some size was seen more than once.
    pub fn record(&mut self, num_tokens: usize, took: Duration, now: Instant) -> Option<String> {
        self.times
            .entry(num_tokens)
            .or_default()
            .push(took.as_secs_f64() * 1000.0);
        if now.saturating_duration_since(self.last) <= self.interval {
            return None;
        }
        self.last = now;
        let stats = self.stats();
        (!stats.is_empty()).then(|| {
            let items: Vec<String> = stats
                .iter()
                .map(|(bs, n, median)| format!("({bs}, {n}, {median:.2})"))
                .collect();
            format!(
                "Batchsize forward time stats (batchsize, count, median_time(ms)): [{}]",
                items.join(", ")
            )
        })
    }

    /// (batch size, count, median ms), most frequent first. A size seen
    /// once is left out, as vLLM does: it is usually a warm-up or profiling run.
    pub fn stats(&self) -> Vec<(usize, usize, f64)> {
        let mut out: Vec<(usize, usize, f64)> = self
            .times
            .iter()
            .filter(|(_, t)| t.len() > 1)
            .map(|(&bs, t)| (bs, t.len(), median(t)))
            .collect();
        // Stable: equal counts stay in batch-size order.
        out.sort_by_key(|s| std::cmp::Reverse(s.1));
        out
    }
}

/// torch.quantile(q=0.5)'s median: the mean of the middle two for even counts.
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

/// Prints vLLM's periodic throughput line from counter deltas.
#[derive(Debug)]
pub struct StatLogger {
    interval: Duration,
    last: Instant,
    last_prompt: u64,
    last_generation: u64,
    last_queries: u64,
    last_hits: u64,
}

impl StatLogger {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: Instant::now(),
            last_prompt: 0,
            last_generation: 0,
            last_queries: 0,
            last_hits: 0,
        }
    }

    /// The log line when the interval has passed, else `None`; the flag
    /// says whether anything happened (vLLM logs idle lines at debug level).
    pub fn maybe_line(
        &mut self,
        now: Instant,
        g: &SchedulerGauges,
        m: &EngineMetrics,
    ) -> Option<(String, bool)> {
        let dt = now.duration_since(self.last);
        if dt < self.interval {
            return None;
        }
        let secs = dt.as_secs_f64().max(1e-9);
        let queries = g.prefix_cache_queries - self.last_queries;
        let hits = g.prefix_cache_hits - self.last_hits;
        let active = m.prompt_tokens != self.last_prompt
            || m.generation_tokens != self.last_generation
            || g.num_running + g.num_waiting > 0;
        let line = format_stats_line(
            (m.prompt_tokens - self.last_prompt) as f64 / secs,
            (m.generation_tokens - self.last_generation) as f64 / secs,
            g,
            if queries == 0 {
                0.0
            } else {
                hits as f64 / queries as f64
            },
        );
        self.last = now;
        self.last_prompt = m.prompt_tokens;
        self.last_generation = m.generation_tokens;
        self.last_queries = g.prefix_cache_queries;
        self.last_hits = g.prefix_cache_hits;
        Some((line, active))
    }
}

pub fn format_stats_line(
    prompt_tps: f64,
    gen_tps: f64,
    g: &SchedulerGauges,
    hit_rate: f64,
) -> String {
    format!(
        "Avg prompt throughput: {prompt_tps:.1} tokens/s, Avg generation throughput: {gen_tps:.1} tokens/s, \
         Running: {} reqs, Waiting: {} reqs, GPU KV cache usage: {:.1}%, Prefix cache hit rate: {:.1}%",
        g.num_running,
        g.num_waiting,
        g.kv_cache_usage * 100.0,
        hit_rate * 100.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut m = EngineMetrics::default();
        m.ttft.observe(0.003);
        m.ttft.observe(0.003);
        m.ttft.observe(5000.0);
        m.record_finished("stop", Duration::from_millis(400));
        m.record_finished("length", Duration::from_secs(1));
        let text = render("my \"m\"", &SchedulerGauges::default(), &m);
        let l = r#"model_name="my \"m\"""#;
        for want in [
            format!("vllm:time_to_first_token_seconds_bucket{{{l},le=\"0.001\"}} 0"),
            format!("vllm:time_to_first_token_seconds_bucket{{{l},le=\"0.005\"}} 2"),
            format!("vllm:time_to_first_token_seconds_bucket{{{l},le=\"2560.0\"}} 2"),
            format!("vllm:time_to_first_token_seconds_bucket{{{l},le=\"+Inf\"}} 3"),
            format!("vllm:time_to_first_token_seconds_count{{{l}}} 3"),
            format!("vllm:request_success_total{{{l},finished_reason=\"stop\"}} 1"),
            format!("vllm:request_success_total{{{l},finished_reason=\"length\"}} 1"),
            format!("vllm:e2e_request_latency_seconds_bucket{{{l},le=\"0.5\"}} 1"),
            "# TYPE vllm:kv_cache_usage_perc gauge".to_string(),
            "# TYPE vllm:prompt_tokens_total counter".to_string(),
        ] {
            assert!(text.contains(&want), "missing {want} in\n{text}");
        }
    }

    #[test]
    fn stats_line_uses_deltas() {
        let start = Instant::now();
        let mut log = StatLogger::new(Duration::from_secs(10));
        log.last = start;
        let mut m = EngineMetrics::default();
        let mut g = SchedulerGauges {
            num_running: 2,
            num_waiting: 1,
            kv_cache_usage: 0.125,
            prefix_cache_queries: 100,
            prefix_cache_hits: 25,
            num_preemptions: 0,
        };
        m.prompt_tokens = 100;
        m.generation_tokens = 50;
        assert!(log
            .maybe_line(start + Duration::from_secs(1), &g, &m)
            .is_none());
        let (line, active) = log
            .maybe_line(start + Duration::from_secs(10), &g, &m)
            .unwrap();
        assert!(active);
        assert_eq!(
            line,
            "Avg prompt throughput: 10.0 tokens/s, Avg generation throughput: 5.0 tokens/s, \
             Running: 2 reqs, Waiting: 1 reqs, GPU KV cache usage: 12.5%, Prefix cache hit rate: 25.0%"
        );
        g.prefix_cache_queries = 200;
        m.generation_tokens = 70;
        let (line, _) = log
            .maybe_line(start + Duration::from_secs(20), &g, &m)
            .unwrap();
        assert!(line.contains("generation throughput: 2.0 tokens/s"));
        assert!(line.contains("hit rate: 0.0%"));
        g.num_running = 0;
        g.num_waiting = 0;
        let (_, active) = log
            .maybe_line(start + Duration::from_secs(30), &g, &m)
            .unwrap();
        assert!(!active, "nothing happened in the last interval");
    }

    #[test]
    fn batch_size_log_counts_sizes_seen_more_than_once() {
        assert!(BatchSizeLogger::new(-1.0).is_none(), "-1 is off");
        let mut l = BatchSizeLogger::new(5.0).unwrap();
        let t0 = l.last;
        let ms = Duration::from_millis;
        assert_eq!(l.record(8, ms(10), t0), None);
        assert_eq!(l.record(8, ms(30), t0 + Duration::from_secs(1)), None);
        assert_eq!(l.record(1, ms(2), t0 + Duration::from_secs(2)), None);
        for t in [4, 6, 5] {
            assert_eq!(l.record(3, ms(t), t0 + Duration::from_secs(3)), None);
        }
        let line = l.record(3, ms(100), t0 + Duration::from_secs(6)).unwrap();
        assert_eq!(
            line,
            "Batchsize forward time stats (batchsize, count, median_time(ms)): \
             [(3, 4, 5.50), (8, 2, 20.00)]"
        );
        // The next line waits for the next interval.
        assert_eq!(l.record(3, ms(1), t0 + Duration::from_secs(7)), None);
        // 0 logs at every step once a size repeats.
        let mut l = BatchSizeLogger::new(0.0).unwrap();
        let t0 = l.last;
        assert_eq!(l.record(2, ms(1), t0 + ms(1)), None, "seen once");
        assert!(l.record(2, ms(1), t0 + ms(2)).is_some());
    }
}
