//! Token sampling with vLLM's semantics. Order: the structured-output token
//! bitmask (as vLLM v1 applies `grammar_bitmask` to the logits before its
//! sampler), raw logprobs (before any other processing), allowed_token_ids, min_tokens stop masking, logit_bias,
//! penalties, then greedy argmax or temperature -> min_p -> top_k -> top_p
//! -> draw. A seeded request draws from a counter-based generator keyed by
//! (seed, output index), so its tokens do not depend on the batch around it
//! or on preemption.

use std::collections::{HashMap, HashSet};

use rand::Rng;

use crate::sampling_params::SamplingParams;
use crate::step::TokenLogprobs;

/// One row of `Backend::sample`: what the sampler would do to the row's
/// logits (`sampler::sample_spec` builds it), so a backend can sample where
/// the logits are.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleSpec {
    /// Row of the logits tensor.
    pub logits_row: usize,
    pub greedy: bool,
    /// Tokens without an `allowed` edit are masked (allowed_token_ids).
    pub allowlist: bool,
    /// At most one per token, ids inside the vocabulary.
    pub edits: Vec<LogitEdit>,
    /// 1 / temperature, as the sampler computes it.
    pub inv_temperature: f32,
    pub min_p: f32,
    /// 0: off.
    pub top_k: u32,
    pub top_p: f32,
    /// The draw's uniform in [0, 1).
    pub u: f64,
    /// The chosen token's raw logprob and rank are wanted.
    pub logprobs: bool,
    /// A structured-output row's token bitmask (bit `t % 32` of word
    /// `t / 32`; tokens past its end are disallowed): applied before
    /// everything else, logprobs included, as `sampler::sample_masked` does.
    pub bitmask: Option<Vec<u32>>,
}

/// What the sampler does to one token's logit, in its order: masked when
/// `banned` (or, under an allowlist, not `allowed`), then `+= bias`, the
/// repetition penalty (÷ when positive, × otherwise; 1 = none), `-= subtract`
/// (frequency × count + presence).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogitEdit {
    pub token: u32,
    pub allowed: bool,
    pub banned: bool,
    pub bias: f32,
    pub repetition: f32,
    pub subtract: f32,
}

/// One row's result of `Backend::sample`. `logit`, `rank` and
/// `log_sum_exp` (of the raw logits) are set where `SampleSpec::logprobs`
/// asked for them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceSampled {
    pub token: u32,
    pub logit: f32,
    pub rank: usize,
    pub log_sum_exp: f32,
}

/// One row's `Backend::top_logits`: raw logits, not logprobs.
#[derive(Clone, Debug, PartialEq)]
pub struct RowTop {
    pub log_sum_exp: f32,
    /// (token id, logit), largest first.
    pub top: Vec<(u32, f32)>,
}

/// What the sampler remembers about one request.
#[derive(Clone, Debug, Default)]
pub struct SamplerState {
    /// Output token counts (frequency/presence penalties).
    output_counts: HashMap<u32, u32>,
    /// Distinct prompt tokens, kept only when repetition_penalty != 1.
    prompt_tokens: Option<HashSet<u32>>,
    num_output: usize,
}

impl SamplerState {
    pub fn new(params: &SamplingParams, prompt: &[u32], output: &[u32]) -> Self {
        let mut s = Self {
            prompt_tokens: (params.repetition_penalty != 1.0)
                .then(|| prompt.iter().copied().collect()),
            ..Default::default()
        };
        for &t in output {
            s.push_output(t);
        }
        s
    }

    pub fn push_output(&mut self, token: u32) {
        *self.output_counts.entry(token).or_default() += 1;
        self.num_output += 1;
    }

    pub fn num_output(&self) -> usize {
        self.num_output
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Uniform in [0, 1) for output index `index` of a request seeded `seed`.
pub fn seeded_uniform(seed: u64, index: u64) -> f64 {
    let bits = splitmix64(splitmix64(seed) ^ splitmix64(index.wrapping_add(0x5851_F42D_4C95_7F2D)));
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    max + row.iter().map(|&x| (x - max).exp()).sum::<f32>().ln()
}

/// The `k` largest logits of `logits` (larger first, then lower id) and its
/// log-sum-exp: what a backend's `top_logits` returns for one row.
pub fn row_top(logits: &[f32], k: usize) -> RowTop {
    RowTop {
        log_sum_exp: log_sum_exp(logits),
        top: top_k(logits, k),
    }
}

fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    let by_logit_desc = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by_logit_desc);
    }
    idx.truncate(k);
    idx.sort_unstable_by(by_logit_desc);
    idx.into_iter().map(|t| (t, logits[t as usize])).collect()
}

/// Whether greedy sampling of `p` takes the raw argmax: nothing (masks,
/// bias, penalties, min_tokens) changes the logits first. Such rows are
/// sampled from `Backend::top_logits` without their whole row.
pub fn takes_raw_argmax(p: &SamplingParams, st: &SamplerState) -> bool {
    p.is_greedy()
        && p.allowed_token_ids.is_none()
        && p.logit_bias.is_empty()
        && p.repetition_penalty == 1.0
        && p.frequency_penalty == 0.0
        && p.presence_penalty == 0.0
        && (st.num_output >= p.min_tokens || p.all_stop_token_ids.is_empty())
}

/// The greedy choice and its logprobs from a row's `RowTop` (which holds at
/// least 1 + `p.logprobs` entries), as `sample` gives them for a request
/// with `takes_raw_argmax`.
pub fn sample_from_top(row: &RowTop, p: &SamplingParams) -> Sampled {
    let (token, logit) = row.top[0];
    let lse = row.log_sum_exp;
    Sampled {
        token,
        logprobs: p.logprobs.map(|k| TokenLogprobs {
            token_id: token,
            logprob: logit - lse,
            rank: 1,
            top: row.top.iter().take(k).map(|&(t, l)| (t, l - lse)).collect(),
        }),
    }
}

/// Logprob, 1-based rank and top-`k` of `token` under `logits` (unprocessed).
pub fn token_logprobs(logits: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let lse = log_sum_exp(logits);
    let chosen = logits[token as usize];
    let rank = 1 + logits.iter().filter(|&&x| x > chosen).count();
    TokenLogprobs {
        token_id: token,
        logprob: chosen - lse,
        rank,
        top: top_k(logits, k)
            .into_iter()
            .map(|(t, l)| (t, l - lse))
            .collect(),
    }
}

/// `token_logprobs` from what a backend computes where the logits are: the
/// row's top (at least `k` entries) and log-sum-exp, and the token's logit
/// and 1-based rank (`Backend::token_ranks`).
pub fn token_logprobs_from_top(
    top: &RowTop,
    token: u32,
    logit: f32,
    rank: usize,
    k: usize,
) -> TokenLogprobs {
    let lse = top.log_sum_exp;
    TokenLogprobs {
        token_id: token,
        logprob: logit - lse,
        rank,
        top: top.top.iter().take(k).map(|&(t, l)| (t, l - lse)).collect(),
    }
}

/// The uniform a non-greedy row draws with: keyed by (seed, output index)
/// for a seeded request, else from `rng`.
pub fn draw_uniform(p: &SamplingParams, st: &SamplerState, rng: &mut impl Rng) -> f64 {
    match p.seed {
        Some(seed) => seeded_uniform(seed, st.num_output as u64),
        None => rng.random::<f64>(),
    }
}

/// How `sample` treats one row of `vocab` logits, for a backend that
/// samples where the logits are (`Backend::sample`): the edits `process`
/// makes, composed per token, and the draw's settings. `u` is
/// `draw_uniform`'s (unused when greedy).
pub fn sample_spec(
    p: &SamplingParams,
    st: &SamplerState,
    vocab: usize,
    logits_row: usize,
    u: f64,
) -> SampleSpec {
    let mut edits: std::collections::BTreeMap<u32, LogitEdit> = Default::default();
    // Ids outside the vocabulary change nothing, as in `process`.
    fn at(
        edits: &mut std::collections::BTreeMap<u32, LogitEdit>,
        vocab: usize,
        t: u32,
    ) -> Option<&mut LogitEdit> {
        ((t as usize) < vocab).then(|| {
            edits.entry(t).or_insert(LogitEdit {
                token: t,
                allowed: false,
                banned: false,
                bias: 0.0,
                repetition: 1.0,
                subtract: 0.0,
            })
        })
    }
    if let Some(allowed) = &p.allowed_token_ids {
        for &t in allowed {
            if let Some(e) = at(&mut edits, vocab, t) {
                e.allowed = true;
            }
        }
    }
    if st.num_output < p.min_tokens {
        for &t in &p.all_stop_token_ids {
            if let Some(e) = at(&mut edits, vocab, t) {
                e.banned = true;
            }
        }
    }
    for &(t, b) in &p.logit_bias {
        if let Some(e) = at(&mut edits, vocab, t) {
            e.bias += b;
        }
    }
    if p.repetition_penalty != 1.0 {
        for &t in st
            .prompt_tokens
            .iter()
            .flatten()
            .chain(st.output_counts.keys())
        {
            if let Some(e) = at(&mut edits, vocab, t) {
                e.repetition = p.repetition_penalty;
            }
        }
    }
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        for (&t, &c) in &st.output_counts {
            if let Some(e) = at(&mut edits, vocab, t) {
                e.subtract = p.frequency_penalty * c as f32 + p.presence_penalty;
            }
        }
    }
    SampleSpec {
        logits_row,
        greedy: p.is_greedy(),
        allowlist: p.allowed_token_ids.is_some(),
        edits: edits.into_values().collect(),
        inv_temperature: 1.0 / p.temperature,
        min_p: p.min_p,
        top_k: p.top_k.max(0) as u32,
        top_p: p.top_p,
        u,
        logprobs: p.logprobs.is_some(),
        bitmask: None,
    }
}

/// A `Backend::sample` result as `sample` returns it; `top` holds the raw
/// top logits of the row (at least `p.logprobs` of them) where logprobs are
/// asked for.
pub fn sampled_from_device(d: &DeviceSampled, top: Option<&RowTop>, p: &SamplingParams) -> Sampled {
    Sampled {
        token: d.token,
        logprobs: p.logprobs.map(|k| TokenLogprobs {
            token_id: d.token,
            logprob: d.logit - d.log_sum_exp,
            rank: d.rank,
            top: top
                .map(|row| {
                    row.top
                        .iter()
                        .take(k)
                        .map(|&(t, l)| (t, l - d.log_sum_exp))
                        .collect()
                })
                .unwrap_or_default(),
        }),
    }
}

/// The processed logits (masks, bias, penalties) in place.
fn process(logits: &mut [f32], p: &SamplingParams, st: &SamplerState) {
    if let Some(allowed) = &p.allowed_token_ids {
        let mut keep = vec![false; logits.len()];
        for &t in allowed {
            if let Some(k) = keep.get_mut(t as usize) {
                *k = true;
            }
        }
        for (x, k) in logits.iter_mut().zip(keep) {
            if !k {
                *x = f32::NEG_INFINITY;
            }
        }
    }
    if st.num_output < p.min_tokens {
        for &t in &p.all_stop_token_ids {
            if let Some(x) = logits.get_mut(t as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
    }
    for &(t, b) in &p.logit_bias {
        if let Some(x) = logits.get_mut(t as usize) {
            *x += b;
        }
    }
    if p.repetition_penalty != 1.0 {
        let rp = p.repetition_penalty;
        let seen = st
            .prompt_tokens
            .iter()
            .flatten()
            .chain(st.output_counts.keys());
        let mut done = HashSet::new();
        for &t in seen {
            if done.insert(t) {
                if let Some(x) = logits.get_mut(t as usize) {
                    // Any positive penalty is valid (vLLM's range), and a tiny
                    // one divides a logit to +inf; the largest finite value
                    // keeps the softmax defined (inf - inf would be NaN).
                    *x = if *x > 0.0 {
                        (*x / rp).min(f32::MAX)
                    } else {
                        *x * rp
                    };
                }
            }
        }
    }
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        for (&t, &c) in &st.output_counts {
            if let Some(x) = logits.get_mut(t as usize) {
                *x -= p.frequency_penalty * c as f32 + p.presence_penalty;
            }
        }
    }
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// The chosen token and, if asked, its logprobs.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprobs: Option<TokenLogprobs>,
}

/// Samples one token from `logits` (modified in place). `rng` is used for
/// requests without a seed.
pub fn sample(
    logits: &mut [f32],
    p: &SamplingParams,
    st: &SamplerState,
    rng: &mut impl Rng,
) -> Sampled {
    let raw = p.logprobs.map(|_| logits.to_vec());
    process(logits, p, st);
    let token = if p.is_greedy() {
        argmax(logits)
    } else {
        let u = draw_uniform(p, st, rng);
        draw(logits, p, u)
    };
    Sampled {
        token,
        logprobs: raw.map(|raw| token_logprobs(&raw, token, p.logprobs.unwrap_or(0))),
    }
}

/// Disallows (-inf) every token whose bit is clear in `mask` (bit `t % 32`
/// of word `t / 32`); tokens past the mask's end are disallowed too.
pub fn apply_token_bitmask(logits: &mut [f32], mask: &[u32]) {
    for (w, chunk) in logits.chunks_mut(32).enumerate() {
        let word = mask.get(w).copied().unwrap_or(0);
        if word == u32::MAX {
            continue;
        }
        for (b, x) in chunk.iter_mut().enumerate() {
            if word & (1 << b) == 0 {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// `sample` after the row's structured-output bitmask, when it has one:
/// every sampling mode then draws only among the tokens the grammar allows,
/// and logprobs are those of the masked logits (as in vLLM v1).
pub fn sample_masked(
    logits: &mut [f32],
    p: &SamplingParams,
    st: &SamplerState,
    mask: Option<&[u32]>,
    rng: &mut impl Rng,
) -> Sampled {
    if let Some(mask) = mask {
        apply_token_bitmask(logits, mask);
    }
    sample(logits, p, st, rng)
}

/// temperature -> min_p -> top_k -> top_p, then the token at cumulative
/// probability `u`. `logits` becomes the probabilities.
fn draw(logits: &mut [f32], p: &SamplingParams, u: f64) -> u32 {
    let inv_t = 1.0 / p.temperature;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        // Everything masked: nothing better than token 0 exists.
        return 0;
    }
    let mut sum = 0f32;
    for x in logits.iter_mut() {
        *x = ((*x - max) * inv_t).exp();
        sum += *x;
    }
    // Relative to the max prob (which is exp(0) = 1 before normalizing).
    if p.min_p > 0.0 {
        let floor = p.min_p;
        sum = 0.0;
        for x in logits.iter_mut() {
            if *x < floor {
                *x = 0.0;
            }
            sum += *x;
        }
    }
    let top_k = if p.top_k > 0 {
        p.top_k as usize
    } else {
        usize::MAX
    };
    if top_k < logits.len() || p.top_p < 1.0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| logits[i as usize] > 0.0)
            .collect();
        let desc = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        if top_k < idx.len() {
            idx.select_nth_unstable_by(top_k - 1, desc);
            idx.truncate(top_k);
        }
        idx.sort_unstable_by(desc);
        let total: f32 = idx.iter().map(|&i| logits[i as usize]).sum();
        let mut keep = idx.len();
        if p.top_p < 1.0 {
            let mut cum = 0f32;
            for (n, &i) in idx.iter().enumerate() {
                cum += logits[i as usize] / total;
                if cum >= p.top_p {
                    keep = n + 1;
                    break;
                }
            }
        }
        idx.truncate(keep.max(1));
        let total: f64 = idx.iter().map(|&i| logits[i as usize] as f64).sum();
        let target = u * total;
        let mut cum = 0f64;
        for &i in &idx {
            cum += logits[i as usize] as f64;
            if cum > target {
                return i;
            }
        }
        return *idx.last().expect("at least one token kept");
    }
    let target = u * sum as f64;
    let mut cum = 0f64;
    let mut last = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > 0.0 {
            cum += x as f64;
            last = i;
            if cum > target {
                return i as u32;
            }
        }
    }
    last as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(0)
    }

    fn run(logits: &[f32], p: &SamplingParams, st: &SamplerState) -> u32 {
        sample(&mut logits.to_vec(), p, st, &mut rng()).token
    }

    fn greedy() -> SamplingParams {
        SamplingParams::greedy()
    }

    #[test]
    fn prompt_logprobs_from_a_rows_top_match_the_whole_row() {
        let row: Vec<f32> = (0..500)
            .map(|i| ((i * 7919) % 263) as f32 * 0.05 - 4.0)
            .collect();
        let top = RowTop {
            log_sum_exp: log_sum_exp(&row),
            top: top_k(&row, 8),
        };
        for token in [0u32, 17, 262, 499] {
            let rank = 1 + row.iter().filter(|&&x| x > row[token as usize]).count();
            for k in [0, 1, 5, 8] {
                assert_eq!(
                    token_logprobs_from_top(&top, token, row[token as usize], rank, k),
                    token_logprobs(&row, token, k)
                );
            }
        }
    }

    #[test]
    fn greedy_takes_argmax() {
        assert_eq!(
            run(&[0.1, 3.0, 2.0], &greedy(), &SamplerState::default()),
            1
        );
        let p = SamplingParams {
            temperature: 1e-6,
            ..Default::default()
        };
        assert_eq!(run(&[0.1, 3.0, 2.0], &p, &SamplerState::default()), 1);
    }

    #[test]
    fn allowed_tokens_and_logit_bias() {
        let p = SamplingParams {
            allowed_token_ids: Some(vec![0, 2]),
            ..greedy()
        };
        assert_eq!(run(&[0.1, 3.0, 2.0], &p, &SamplerState::default()), 2);
        let p = SamplingParams {
            logit_bias: vec![(0, 10.0)],
            ..greedy()
        };
        assert_eq!(run(&[0.1, 3.0, 2.0], &p, &SamplerState::default()), 0);
    }

    #[test]
    fn min_tokens_masks_stop_tokens() {
        let p = SamplingParams {
            min_tokens: 2,
            all_stop_token_ids: vec![1],
            ..greedy()
        };
        let mut st = SamplerState::new(&p, &[], &[0]);
        assert_eq!(run(&[0.1, 3.0, 2.0], &p, &st), 2);
        st.push_output(2);
        assert_eq!(run(&[0.1, 3.0, 2.0], &p, &st), 1);
    }

    #[test]
    fn repetition_penalty_covers_prompt_and_output() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..greedy()
        };
        // Token 1 seen in the prompt: 3.0 -> 1.5 < 2.0.
        assert_eq!(
            run(&[0.1, 3.0, 2.0], &p, &SamplerState::new(&p, &[1], &[])),
            2
        );
        // Negative logits are multiplied: -1 -> -2 < -1.5.
        assert_eq!(
            run(&[-1.0, -1.5, -3.0], &p, &SamplerState::new(&p, &[], &[0])),
            1
        );
        assert_eq!(
            run(&[0.1, 3.0, 2.0], &p, &SamplerState::new(&p, &[], &[])),
            1
        );
    }

    #[test]
    fn a_tiny_repetition_penalty_keeps_sampling_defined() {
        // 1e-45 (what a request's 2.2e-308 narrows to) sends 3.0 to +inf.
        let p = SamplingParams {
            repetition_penalty: f32::from_bits(1),
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        let st = SamplerState::new(&p, &[1], &[]);
        assert_eq!(run(&[0.1, 3.0, 2.0], &p, &st), 1);
        let p = SamplingParams { top_p: 1.0, ..p };
        assert_eq!(run(&[0.1, 3.0, 2.0], &p, &st), 1);
    }

    #[test]
    fn presence_and_frequency_count_output_only() {
        let p = SamplingParams {
            presence_penalty: 1.5,
            ..greedy()
        };
        assert_eq!(
            run(&[0.1, 3.0, 2.0], &p, &SamplerState::new(&p, &[], &[1])),
            2
        );
        assert_eq!(
            run(&[0.1, 3.0, 2.0], &p, &SamplerState::new(&p, &[1], &[])),
            1,
            "prompt tokens are not penalized"
        );
        let p = SamplingParams {
            frequency_penalty: 0.4,
            ..greedy()
        };
        assert_eq!(
            run(&[0.1, 3.0, 2.0], &p, &SamplerState::new(&p, &[], &[1, 1])),
            1,
            "3.0 - 0.8 = 2.2 > 2.0"
        );
        assert_eq!(
            run(
                &[0.1, 3.0, 2.0],
                &p,
                &SamplerState::new(&p, &[], &[1, 1, 1])
            ),
            2,
            "3.0 - 1.2 < 2.0"
        );
    }

    fn histogram(logits: &[f32], p: &SamplingParams, n: usize) -> Vec<usize> {
        let mut h = vec![0; logits.len()];
        let mut r = rng();
        for _ in 0..n {
            h[sample(&mut logits.to_vec(), p, &SamplerState::default(), &mut r).token as usize] +=
                1;
        }
        h
    }

    #[test]
    fn top_k_top_p_min_p_restrict_the_support() {
        let logits = [2.0, 1.9, 1.8, 0.0, -1.0];
        let h = histogram(
            &logits,
            &SamplingParams {
                top_k: 2,
                ..Default::default()
            },
            400,
        );
        assert!(
            h[0] > 0 && h[1] > 0 && h[2..].iter().all(|&c| c == 0),
            "{h:?}"
        );
        // probs ~ [.33,.30,.27,.06,.02]: top_p 0.5 keeps the first two.
        let h = histogram(
            &logits,
            &SamplingParams {
                top_p: 0.5,
                ..Default::default()
            },
            400,
        );
        assert!(
            h[0] > 0 && h[1] > 0 && h[2..].iter().all(|&c| c == 0),
            "{h:?}"
        );
        // min_p 0.5 keeps tokens with p >= 0.5 * p_max: the first three.
        let h = histogram(
            &logits,
            &SamplingParams {
                min_p: 0.5,
                ..Default::default()
            },
            400,
        );
        assert!(
            h[..3].iter().all(|&c| c > 0) && h[3..].iter().all(|&c| c == 0),
            "{h:?}"
        );
        // Temperature: a low one concentrates on the argmax.
        // At T=0.05 token 0 has p ~ 0.87.
        let h = histogram(
            &logits,
            &SamplingParams {
                temperature: 0.05,
                ..Default::default()
            },
            200,
        );
        assert!(h[0] > 150 && h[3..].iter().all(|&c| c == 0), "{h:?}");
        let h = histogram(
            &logits,
            &SamplingParams {
                temperature: 1.0,
                ..Default::default()
            },
            400,
        );
        assert!(h[3] > 0, "{h:?}");
    }

    #[test]
    fn seeded_sampling_is_reproducible_by_output_index() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = SamplingParams {
            seed: Some(42),
            ..Default::default()
        };
        let seq = |p: &SamplingParams| {
            let mut st = SamplerState::new(p, &[], &[]);
            let mut r = rand::rngs::StdRng::seed_from_u64(rand::random());
            (0..20)
                .map(|_| {
                    let t = sample(&mut logits.clone(), p, &st, &mut r).token;
                    st.push_output(t);
                    t
                })
                .collect::<Vec<_>>()
        };
        let a = seq(&p);
        assert_eq!(a, seq(&p));
        assert_ne!(
            a,
            seq(&SamplingParams {
                seed: Some(43),
                ..p.clone()
            })
        );
        // Resuming after a preemption at index 7 continues the same stream.
        let mut st = SamplerState::new(&p, &[], &a[..7]);
        let t = sample(&mut logits.clone(), &p, &st, &mut rng()).token;
        assert_eq!(t, a[7]);
        st.push_output(t);
    }

    /// Bitmask allowing exactly `allowed` among `n` tokens.
    fn mask_of(n: usize, allowed: &[u32]) -> Vec<u32> {
        let mut m = vec![0u32; n.div_ceil(32)];
        for &t in allowed {
            m[t as usize / 32] |= 1 << (t % 32);
        }
        m
    }

    #[test]
    fn bitmask_applies_to_every_sampling_mode() {
        // 70 tokens (three mask words, the last partial); the favourites
        // (0..10) are all disallowed, so only the mask's tokens can win.
        let n = 70;
        let logits: Vec<f32> = (0..n).map(|i| 10.0 - i as f32 * 0.1).collect();
        let allowed = [33u32, 40, 65];
        let mask = mask_of(n, &allowed);
        let modes = vec![
            ("greedy", greedy()),
            ("temperature", SamplingParams::default()),
            (
                "top_k",
                SamplingParams {
                    top_k: 2,
                    ..Default::default()
                },
            ),
            (
                "top_p",
                SamplingParams {
                    top_p: 0.3,
                    ..Default::default()
                },
            ),
            (
                "min_p",
                SamplingParams {
                    min_p: 0.5,
                    ..Default::default()
                },
            ),
            (
                "seeded",
                SamplingParams {
                    seed: Some(3),
                    temperature: 2.0,
                    ..Default::default()
                },
            ),
            (
                "penalties",
                SamplingParams {
                    repetition_penalty: 1.5,
                    presence_penalty: 1.0,
                    frequency_penalty: 1.0,
                    ..greedy()
                },
            ),
            (
                "logit_bias on a masked token",
                SamplingParams {
                    logit_bias: vec![(1, 100.0)],
                    ..greedy()
                },
            ),
            (
                "logprobs",
                SamplingParams {
                    logprobs: Some(5),
                    temperature: 0.7,
                    ..Default::default()
                },
            ),
        ];
        let mut r = rng();
        for (name, p) in modes {
            let st = SamplerState::new(&p, &[33], &[33, 40]);
            for _ in 0..50 {
                let s = sample_masked(&mut logits.clone(), &p, &st, Some(mask.as_slice()), &mut r);
                assert!(allowed.contains(&s.token), "{name}: drew {}", s.token);
                if let Some(lp) = s.logprobs {
                    // Logprobs are over the masked row: only allowed tokens
                    // have mass, and they sum to one.
                    let finite = lp.top.iter().filter(|(_, l)| l.is_finite());
                    assert!(finite.clone().all(|(t, _)| allowed.contains(t)), "{name}");
                    assert_eq!(finite.count(), allowed.len(), "{name}");
                    let total: f32 = lp.top.iter().map(|(_, l)| l.exp()).sum();
                    assert!((total - 1.0).abs() < 1e-4, "{name}: {total}");
                }
            }
        }
        // Greedy picks the best allowed token; without a mask, the argmax.
        let s = sample_masked(
            &mut logits.clone(),
            &greedy(),
            &SamplerState::default(),
            Some(mask.as_slice()),
            &mut r,
        );
        assert_eq!(s.token, 33);
        let s = sample_masked(
            &mut logits.clone(),
            &greedy(),
            &SamplerState::default(),
            None,
            &mut r,
        );
        assert_eq!(s.token, 0);
        // A mask shorter than the row (model vocab padded past the
        // tokenizer's) disallows the tail.
        let mut row = vec![0.0f32; 40];
        row[39] = 5.0;
        apply_token_bitmask(&mut row, &[1]);
        assert_eq!(argmax(&row), 0);
        assert!(row[1..].iter().all(|x| *x == f32::NEG_INFINITY));
    }

    #[test]
    fn logprobs_are_raw_with_ranks() {
        let logits = [1.0f32, 3.0, 2.0, 0.0];
        let lse = log_sum_exp(&logits);
        // Temperature and top_k do not change the reported logprobs.
        let p = SamplingParams {
            temperature: 0.5,
            top_k: 1,
            logprobs: Some(2),
            seed: Some(1),
            ..Default::default()
        };
        let s = sample(
            &mut logits.to_vec(),
            &p,
            &SamplerState::default(),
            &mut rng(),
        );
        assert_eq!(s.token, 1);
        let lp = s.logprobs.unwrap();
        assert!((lp.logprob - (3.0 - lse)).abs() < 1e-6);
        assert_eq!(lp.rank, 1);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        let lp = token_logprobs(&logits, 3, 0);
        assert_eq!(lp.rank, 4);
        assert!(lp.top.is_empty());
        let total: f32 = logits.iter().map(|&x| (x - lse).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        // Ties share the best rank.
        assert_eq!(token_logprobs(&[1.0, 1.0, 0.0], 1, 0).rank, 1);
    }

    /// The kernel's reading of a `SampleSpec`'s edits, on the host.
    fn apply_spec(raw: &[f32], spec: &SampleSpec) -> Vec<f32> {
        let mut x: Vec<f32> = raw
            .iter()
            .map(|&v| if spec.allowlist { f32::NEG_INFINITY } else { v })
            .collect();
        for e in &spec.edits {
            let mut v = if !spec.allowlist || e.allowed {
                raw[e.token as usize]
            } else {
                f32::NEG_INFINITY
            };
            if e.banned {
                v = f32::NEG_INFINITY;
            }
            v += e.bias;
            if e.repetition != 1.0 {
                v = if v > 0.0 {
                    v / e.repetition
                } else {
                    v * e.repetition
                };
            }
            v -= e.subtract;
            x[e.token as usize] = v;
        }
        x
    }

    #[test]
    fn sample_spec_edits_are_process() {
        let raw: Vec<f32> = (0..40)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37)
            .collect();
        let cases = [
            SamplingParams::default(),
            SamplingParams {
                allowed_token_ids: Some(vec![3, 5, 7, 11, 39, 400]),
                logit_bias: vec![(5, 2.5), (6, -1.0), (999, 1.0)],
                repetition_penalty: 1.3,
                frequency_penalty: 0.4,
                presence_penalty: 0.25,
                min_tokens: 4,
                all_stop_token_ids: vec![7, 12],
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 0.8,
                presence_penalty: -0.5,
                logit_bias: vec![(1, 100.0)],
                min_tokens: 1,
                all_stop_token_ids: vec![1],
                ..Default::default()
            },
        ];
        for p in &cases {
            let st = SamplerState::new(p, &[1, 2, 3, 2, 30], &[5, 5, 6, 7, 12, 2]);
            let mut want = raw.clone();
            process(&mut want, p, &st);
            let spec = sample_spec(p, &st, raw.len(), 0, 0.5);
            let got = apply_spec(&raw, &spec);
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{p:?}"
            );
            assert!(spec.edits.windows(2).all(|w| w[0].token < w[1].token));
        }
    }
}
