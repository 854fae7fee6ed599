//! Latency statistics and the vLLM-style benchmark reports (pure).

use serde::Serialize;

/// Mean, median and p99 of a sample, in the sample's unit.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Summary {
    pub mean: f64,
    pub median: f64,
    pub p99: f64,
}

/// Linear-interpolated percentile (numpy's default), `q` in [0, 100].
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q / 100.0) * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let frac = rank - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

pub fn summarize(values: &[f64]) -> Summary {
    if values.is_empty() {
        return Summary::default();
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    Summary {
        mean: v.iter().sum::<f64>() / v.len() as f64,
        median: percentile(&v, 50.0),
        p99: percentile(&v, 99.0),
    }
}

/// What one streamed request measured.
#[derive(Debug, Clone, Default)]
pub struct RequestTiming {
    pub success: bool,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Seconds from send to the first token.
    pub ttft: f64,
    /// Seconds between consecutive token chunks.
    pub itl: Vec<f64>,
    /// Seconds from send to the end of the stream.
    pub e2e: f64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServingResult {
    pub duration_s: f64,
    pub completed: usize,
    pub failed: usize,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub max_concurrency: usize,
    pub ttft_ms: Summary,
    pub tpot_ms: Summary,
    pub itl_ms: Summary,
    pub e2el_ms: Summary,
}

pub fn serving_result(
    timings: &[RequestTiming],
    duration_s: f64,
    max_concurrency: usize,
) -> ServingResult {
    let ok: Vec<&RequestTiming> = timings.iter().filter(|t| t.success).collect();
    let ms = |v: Vec<f64>| summarize(&v.iter().map(|x| x * 1000.0).collect::<Vec<_>>());
    let input: usize = ok.iter().map(|t| t.prompt_tokens).sum();
    let output: usize = ok.iter().map(|t| t.output_tokens).sum();
    let tpot: Vec<f64> = ok
        .iter()
        .filter(|t| t.output_tokens > 1)
        .map(|t| (t.e2e - t.ttft) / (t.output_tokens - 1) as f64)
        .collect();
    let d = duration_s.max(f64::EPSILON);
    ServingResult {
        duration_s,
        completed: ok.len(),
        failed: timings.len() - ok.len(),
        total_input_tokens: input,
        total_output_tokens: output,
        request_throughput: ok.len() as f64 / d,
        output_throughput: output as f64 / d,
        total_token_throughput: (input + output) as f64 / d,
        max_concurrency,
        ttft_ms: ms(ok.iter().map(|t| t.ttft).collect()),
        tpot_ms: ms(tpot),
        itl_ms: ms(ok.iter().flat_map(|t| t.itl.iter().copied()).collect()),
        e2el_ms: ms(ok.iter().map(|t| t.e2e).collect()),
    }
}

fn line(out: &mut String, label: &str, value: impl std::fmt::Display) {
    out.push_str(&format!("{label:<40} {value}\n"));
}

fn section(out: &mut String, title: &str) {
    out.push_str(&format!("{title:-^50}\n"));
}

fn summary_lines(out: &mut String, name: &str, s: &Summary) {
    line(out, &format!("Mean {name} (ms):"), format!("{:.2}", s.mean));
    line(
        out,
        &format!("Median {name} (ms):"),
        format!("{:.2}", s.median),
    );
    line(out, &format!("P99 {name} (ms):"), format!("{:.2}", s.p99));
}

/// The report in vLLM's `benchmark_serving` layout.
pub fn render_serving(r: &ServingResult) -> String {
    let mut out = String::new();
    out.push_str(&format!("{:=^50}\n", " Serving Benchmark Result "));
    line(&mut out, "Successful requests:", r.completed);
    if r.failed > 0 {
        line(&mut out, "Failed requests:", r.failed);
    }
    line(&mut out, "Maximum request concurrency:", r.max_concurrency);
    line(
        &mut out,
        "Benchmark duration (s):",
        format!("{:.2}", r.duration_s),
    );
    line(&mut out, "Total input tokens:", r.total_input_tokens);
    line(&mut out, "Total generated tokens:", r.total_output_tokens);
    line(
        &mut out,
        "Request throughput (req/s):",
        format!("{:.2}", r.request_throughput),
    );
    line(
        &mut out,
        "Output token throughput (tok/s):",
        format!("{:.2}", r.output_throughput),
    );
    line(
        &mut out,
        "Total Token throughput (tok/s):",
        format!("{:.2}", r.total_token_throughput),
    );
    section(&mut out, "Time to First Token");
    summary_lines(&mut out, "TTFT", &r.ttft_ms);
    section(&mut out, "Time per Output Token (excl. 1st token)");
    summary_lines(&mut out, "TPOT", &r.tpot_ms);
    section(&mut out, "Inter-token Latency");
    summary_lines(&mut out, "ITL", &r.itl_ms);
    section(&mut out, "End-to-end Latency");
    summary_lines(&mut out, "E2EL", &r.e2el_ms);
    out.push_str(&"=".repeat(50));
    out.push('\n');
    out
}

#[derive(Debug, Clone, Serialize)]
pub struct ThroughputResult {
    pub elapsed_time: f64,
    pub num_requests: usize,
    pub total_num_tokens: usize,
    pub total_output_tokens: usize,
    pub requests_per_second: f64,
    pub tokens_per_second: f64,
    pub output_tokens_per_second: f64,
}

pub fn throughput_result(
    elapsed: f64,
    requests: usize,
    prompt_tokens: usize,
    output_tokens: usize,
) -> ThroughputResult {
    let d = elapsed.max(f64::EPSILON);
    ThroughputResult {
        elapsed_time: elapsed,
        num_requests: requests,
        total_num_tokens: prompt_tokens + output_tokens,
        total_output_tokens: output_tokens,
        requests_per_second: requests as f64 / d,
        tokens_per_second: (prompt_tokens + output_tokens) as f64 / d,
        output_tokens_per_second: output_tokens as f64 / d,
    }
}

/// vLLM's `benchmark_throughput` line.
pub fn render_throughput(r: &ThroughputResult) -> String {
    format!(
        "Throughput: {:.2} requests/s, {:.2} total tokens/s, {:.2} output tokens/s\n\
         Total num prompt tokens:  {}\nTotal num output tokens:  {}\n",
        r.requests_per_second,
        r.tokens_per_second,
        r.output_tokens_per_second,
        r.total_num_tokens - r.total_output_tokens,
        r.total_output_tokens
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert!((percentile(&v, 99.0) - 3.97).abs() < 1e-9);
        let s = summarize(&[3.0, 1.0, 2.0]);
        assert_eq!((s.mean, s.median), (2.0, 2.0));
        assert_eq!(summarize(&[]), Summary::default());
    }

    #[test]
    fn serving_report() {
        let t = RequestTiming {
            success: true,
            prompt_tokens: 10,
            output_tokens: 5,
            ttft: 0.1,
            itl: vec![0.05; 4],
            e2e: 0.3,
            error: None,
        };
        let failed = RequestTiming::default();
        let r = serving_result(&[t.clone(), t, failed], 2.0, 2);
        assert_eq!((r.completed, r.failed, r.total_output_tokens), (2, 1, 10));
        assert_eq!(r.output_throughput, 5.0);
        assert!((r.tpot_ms.mean - 50.0).abs() < 1e-9);
        let text = render_serving(&r);
        assert!(text.contains("Output token throughput (tok/s):         5.00"));
        assert!(text.contains("Median TTFT (ms):"));
    }

    #[test]
    fn throughput_report() {
        let r = throughput_result(2.0, 4, 40, 20);
        assert!(render_throughput(&r).starts_with(
            "Throughput: 2.00 requests/s, 30.00 total tokens/s, 10.00 output tokens/s"
        ));
    }
}
