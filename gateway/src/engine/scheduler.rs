//! Continuous batching, vLLM v1 style: each step spends one token budget on
//! running requests first (decodes and unfinished prefill chunks), then on
//! waiting ones; a long prompt is chunked across steps; when blocks run out a
//! running request is preempted (its KV is dropped and later recomputed).

use std::collections::{HashMap, VecDeque};

use worker::{
    CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput, TokenLogprobs,
};

use super::block_manager::BlockManager;
use super::request::{Request, RequestStatus};
use super::types::{EngineRequest, FinishReason, StopMatch};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SchedulingPolicy {
    /// First come, first served; the latest arrival is preempted first.
    #[default]
    Fcfs,
    /// Lowest `priority` value first (then arrival); the highest value is preempted first.
    Priority,
}

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_model_len: usize,
    pub policy: SchedulingPolicy,
    /// A pooling model's engine: every prompt runs whole in one step
    /// (bidirectional attention sees the whole sequence; no chunking, no
    /// prefix cache) and finishes with its pooled vector.
    pub pooling: bool,
}

/// What one request got out of a step.
#[derive(Clone, Debug, Default)]
pub struct RequestUpdate {
    pub request_id: String,
    /// The sampled token, when the step reached the end of the known tokens.
    pub new_token_ids: Vec<u32>,
    pub logprobs: Option<TokenLogprobs>,
    /// Prompt logprobs of this step's chunk: for prompt tokens from
    /// `chunk_start + 1` on (a recompute after preemption starts at 0 again).
    pub prompt_logprobs: Vec<TokenLogprobs>,
    pub chunk_start: usize,
    pub finished: Option<FinishReason>,
    pub num_prompt_tokens: usize,
    pub num_cached_tokens: usize,
    pub num_output_tokens: usize,
    /// A pooling request's vector (it finishes with it).
    pub pooled: Option<Vec<f32>>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct SchedulerStats {
    pub num_running: usize,
    pub num_waiting: usize,
    pub num_preemptions: u64,
    pub num_free_blocks: usize,
    pub num_total_blocks: usize,
    pub kv_cache_usage: f64,
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
}

pub struct Scheduler {
    config: SchedulerConfig,
    block_manager: BlockManager,
    eos_token_ids: Vec<u32>,
    requests: HashMap<String, Request>,
    waiting: VecDeque<String>,
    running: Vec<String>,
    /// Requests the worker must drop at the next step.
    finished_req_ids: Vec<String>,
    next_seq: u64,
    num_preemptions: u64,
}

impl Scheduler {
    pub fn new(
        config: SchedulerConfig,
        block_manager: BlockManager,
        eos_token_ids: Vec<u32>,
    ) -> Self {
        Self {
            config,
            block_manager,
            eos_token_ids,
            requests: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            finished_req_ids: Vec::new(),
            next_seq: 0,
            num_preemptions: 0,
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The ids that end a request (unless `ignore_eos`).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// vLLM's `reset_prefix_cache`: false while requests hold blocks.
    pub fn reset_prefix_cache(&mut self) -> bool {
        self.block_manager.reset_prefix_cache()
    }

    /// After the workers were replaced: every request that ran has been
    /// failed (only never-run ones wait), and nothing of the old KV cache
    /// exists any more (no cached prefix, no request for the workers to drop).
    pub fn reset_for_new_workers(&mut self) {
        debug_assert!(self.running.is_empty(), "requests outlived their workers");
        let bm = &self.block_manager;
        self.block_manager = BlockManager::new(bm.num_blocks(), bm.block_size(), bm.caching());
        self.finished_req_ids.clear();
    }

    /// Queues a request; the caller has validated it. Fills
    /// `all_stop_token_ids` for the sampler.
    pub fn add_request(&mut self, mut req: EngineRequest) {
        let params = &mut req.sampling_params;
        let mut stops: Vec<u32> = if params.ignore_eos {
            Vec::new()
        } else {
            self.eos_token_ids.clone()
        };
        for &t in &params.stop_token_ids {
            if !stops.contains(&t) {
                stops.push(t);
            }
        }
        params.all_stop_token_ids = stops;
        let seq = self.next_seq;
        self.next_seq += 1;
        let id = req.request_id.clone();
        let request = Request::new(req, self.config.max_model_len, &self.eos_token_ids, seq);
        self.requests.insert(id.clone(), request);
        self.waiting.push_back(id);
    }

    pub fn contains(&self, request_id: &str) -> bool {
        self.requests.contains_key(request_id)
    }

    pub fn request(&self, request_id: &str) -> Option<&Request> {
        self.requests.get(request_id)
    }

    pub fn request_ids(&self) -> Vec<String> {
        self.requests.keys().cloned().collect()
    }

    pub fn has_unfinished(&self) -> bool {
        !self.requests.is_empty()
    }

    pub fn stats(&self) -> SchedulerStats {
        let (q, h) = self.block_manager.prefix_cache_counters();
        SchedulerStats {
            num_running: self.running.len(),
            num_waiting: self.waiting.len(),
            num_preemptions: self.num_preemptions,
            num_free_blocks: self.block_manager.num_free_blocks(),
            num_total_blocks: self.block_manager.num_blocks(),
            kv_cache_usage: self.block_manager.usage(),
            prefix_cache_queries: q,
            prefix_cache_hits: h,
        }
    }

    /// Ends a request now (abort, stop string, worker failure) and frees its
    /// blocks at once.
    pub fn finish_request(&mut self, request_id: &str, reason: &FinishReason) -> Option<Request> {
        let mut req = self.requests.remove(request_id)?;
        // Only running requests are in the worker's persistent batch.
        if let Some(pos) = self.running.iter().position(|r| r == request_id) {
            self.running.remove(pos);
            self.finished_req_ids.push(request_id.to_string());
        } else {
            self.waiting.retain(|r| r != request_id);
        }
        self.block_manager.free(request_id);
        req.status = RequestStatus::from_finish_reason(reason);
        Some(req)
    }

    pub fn schedule(&mut self) -> SchedulerOutput {
        self.schedule_at_most(usize::MAX)
    }

    /// `schedule`, with at most `max_seqs` requests in the step: pipeline
    /// stages keep several steps in flight and share the requests between
    /// them, so that every stage has work.
    pub fn schedule_at_most(&mut self, max_seqs: usize) -> SchedulerOutput {
        let mut budget = self.config.max_num_batched_tokens;
        let mut finished_req_ids = std::mem::take(&mut self.finished_req_ids);
        // (request id, tokens, fresh blocks) for running requests, in order.
        let mut scheduled_running: Vec<(String, usize, Vec<u32>)> = Vec::new();
        let mut preempted_any = false;

        let mut i = 0;
        while i < self.running.len() && budget > 0 && scheduled_running.len() < max_seqs {
            let id = self.running[i].clone();
            let req = &self.requests[&id];
            let n = (req.num_tokens() - req.num_computed_tokens)
                .min(budget)
                .min(
                    self.config
                        .max_model_len
                        .saturating_sub(req.num_computed_tokens),
                );
            if n == 0 {
                i += 1;
                continue;
            }
            let total = req.num_computed_tokens + n;
            let mut fresh = None;
            loop {
                if let Some(blocks) = self.block_manager.allocate_slots(&id, total, &[]) {
                    fresh = Some(blocks);
                    break;
                }
                let victim_idx = self.pick_victim();
                let victim = self.running.remove(victim_idx);
                if let Some(pos) = scheduled_running.iter().position(|(r, _, _)| *r == victim) {
                    let (_, tokens, _) = scheduled_running.remove(pos);
                    budget += tokens;
                }
                self.preempt(&victim);
                finished_req_ids.push(victim.clone());
                preempted_any = true;
                if victim == id {
                    break;
                }
            }
            if let Some(blocks) = fresh {
                scheduled_running.push((id.clone(), n, blocks));
                budget -= n;
                i = self
                    .running
                    .iter()
                    .position(|r| *r == id)
                    .expect("still running")
                    + 1;
            } else {
                // The request preempted itself; `i` now points at the next one.
                i = i.min(self.running.len());
            }
        }

        let mut scheduled_new: Vec<(String, usize)> = Vec::new();
        let mut new_requests = Vec::new();
        // As vLLM: no admissions in a step that had to preempt.
        while !preempted_any
            && budget > 0
            && self.running.len() < self.config.max_num_seqs
            && scheduled_running.len() + scheduled_new.len() < max_seqs
        {
            let Some(pos) = self.pick_waiting() else {
                break;
            };
            let id = self.waiting[pos].clone();
            let req = &self.requests[&id];
            // Prompt logprobs need every prompt position computed, and a
            // pooling prompt's hidden states all come from one step.
            let (hit, num_cached) =
                if req.sampling_params.prompt_logprobs.is_some() || self.config.pooling {
                    (Vec::new(), 0)
                } else {
                    self.block_manager.get_computed_blocks(&req.all_token_ids)
                };
            if self.config.pooling && req.num_tokens() > budget {
                // Never chunked: it waits for a step with room for all of it.
                break;
            }
            let n = (req.num_tokens() - num_cached).min(budget);
            if self
                .block_manager
                .allocate_slots(&id, num_cached + n, &hit)
                .is_none()
            {
                break;
            }
            self.waiting.remove(pos);
            let num_tokens = req.num_tokens();
            self.block_manager
                .record_prefix_query(num_tokens, num_cached);
            let req = self.requests.get_mut(&id).expect("waiting request exists");
            req.status = RequestStatus::Running;
            req.num_computed_tokens = num_cached;
            req.num_cached_tokens.get_or_insert(num_cached);
            new_requests.push(NewRequestData {
                req_id: id.clone(),
                prompt_token_ids: req.prompt_token_ids().to_vec(),
                output_token_ids: req.output_token_ids().to_vec(),
                sampling_params: req.sampling_params.clone(),
                block_ids: self.block_manager.block_ids(&id).to_vec(),
                num_computed_tokens: num_cached,
            });
            self.running.push(id.clone());
            scheduled_new.push((id, n));
            budget -= n;
        }

        let mut out = SchedulerOutput {
            new_requests,
            finished_req_ids,
            ..Default::default()
        };
        for (id, n, fresh) in scheduled_running {
            let req = &self.requests[&id];
            let computed = req.num_computed_tokens;
            let outputs_from = computed.max(req.num_prompt_tokens);
            out.cached_requests.push(CachedRequestData {
                req_id: id.clone(),
                new_block_ids: fresh,
                num_computed_tokens: computed,
                new_token_ids: req
                    .all_token_ids
                    .get(outputs_from..computed + n)
                    .unwrap_or_default()
                    .to_vec(),
            });
            out.num_scheduled_tokens.push((id, n));
        }
        out.num_scheduled_tokens.extend(scheduled_new);
        // The KV of scheduled tokens counts as computed from here on.
        for (id, n) in &out.num_scheduled_tokens {
            self.requests
                .get_mut(id)
                .expect("scheduled request exists")
                .num_computed_tokens += n;
        }
        if out.is_empty() {
            // Not run: the worker must still hear of these at the next step.
            self.finished_req_ids = std::mem::take(&mut out.finished_req_ids);
        }
        out
    }

    /// Applies a step's results: appends sampled tokens, checks EOS, stop
    /// ids and length, and frees finished requests.
    pub fn update_from_output(
        &mut self,
        step: &SchedulerOutput,
        out: &ModelRunnerOutput,
    ) -> Vec<RequestUpdate> {
        let scheduled: HashMap<&str, usize> = step
            .num_scheduled_tokens
            .iter()
            .map(|(r, n)| (r.as_str(), *n))
            .collect();
        let mut updates = Vec::with_capacity(out.req_ids.len());
        for (idx, id) in out.req_ids.iter().enumerate() {
            let Some(req) = self.requests.get_mut(id) else {
                continue;
            };
            if req.status != RequestStatus::Running {
                continue;
            }
            let mut update = RequestUpdate {
                request_id: id.clone(),
                prompt_logprobs: out.prompt_logprobs.get(idx).cloned().unwrap_or_default(),
                chunk_start: req
                    .num_computed_tokens
                    .saturating_sub(scheduled.get(id.as_str()).copied().unwrap_or(0)),
                ..Default::default()
            };
            if self.config.pooling {
                update.num_prompt_tokens = req.num_prompt_tokens;
                update.pooled = out.pooled.get(idx).cloned().flatten();
                // vLLM finishes a pooled request as stopped; a step that
                // brought no vector for it (a worker fault) aborts it.
                let reason = match update.pooled {
                    Some(_) => FinishReason::Stop(StopMatch::Eos),
                    None => FinishReason::Abort,
                };
                self.finish_request(id, &reason);
                update.finished = Some(reason);
                updates.push(update);
                continue;
            }
            let sampled = out.sampled_token_ids.get(idx).copied().flatten();
            // A token only counts when the step reached the end of the known tokens.
            if let Some(tok) = sampled.filter(|_| req.num_computed_tokens == req.num_tokens()) {
                update.finished = req.append_and_check_stop(tok, self.config.max_model_len);
                update.new_token_ids.push(tok);
                update.logprobs = out.logprobs.get(idx).cloned().flatten();
            }
            update.num_prompt_tokens = req.num_prompt_tokens;
            update.num_cached_tokens = req.num_cached_tokens.unwrap_or(0);
            update.num_output_tokens = req.num_output_tokens();
            self.block_manager
                .cache_blocks(id, &req.all_token_ids, req.num_computed_tokens);
            if let Some(reason) = &update.finished {
                self.finish_request(id, reason);
            }
            updates.push(update);
        }
        updates
    }

    fn preempt(&mut self, id: &str) {
        self.block_manager.free(id);
        let req = self.requests.get_mut(id).expect("preempted request exists");
        req.status = RequestStatus::Preempted;
        req.num_computed_tokens = 0;
        req.num_preemptions += 1;
        self.num_preemptions += 1;
        self.waiting.push_front(id.to_string());
    }

    fn pick_victim(&self) -> usize {
        match self.config.policy {
            SchedulingPolicy::Fcfs => self.running.len() - 1,
            SchedulingPolicy::Priority => {
                let key = |id: &String| {
                    let r = &self.requests[id];
                    (r.priority, r.arrival_time, r.arrival_seq)
                };
                (0..self.running.len())
                    .max_by_key(|&i| key(&self.running[i]))
                    .expect("running is not empty")
            }
        }
    }

    fn pick_waiting(&self) -> Option<usize> {
        match self.config.policy {
            SchedulingPolicy::Fcfs => (!self.waiting.is_empty()).then_some(0),
            SchedulingPolicy::Priority => (0..self.waiting.len()).min_by_key(|&i| {
                let r = &self.requests[&self.waiting[i]];
                (r.priority, r.arrival_time, r.arrival_seq)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use worker::SamplingParams;

    use super::*;
    use crate::engine::types::StopMatch;

    const EOS: u32 = 0;

    fn sched(
        max_num_seqs: usize,
        budget: usize,
        blocks: usize,
        policy: SchedulingPolicy,
    ) -> Scheduler {
        let config = SchedulerConfig {
            max_num_seqs,
            max_num_batched_tokens: budget,
            max_model_len: 1024,
            policy,
            pooling: false,
        };
        Scheduler::new(config, BlockManager::new(blocks, 4, true), vec![EOS])
    }

    fn req(id: &str, prompt_len: usize, max_tokens: usize) -> EngineRequest {
        EngineRequest {
            request_id: id.into(),
            prompt_token_ids: (1..=prompt_len as u32).collect(),
            sampling_params: SamplingParams {
                max_tokens: Some(max_tokens),
                ..SamplingParams::greedy()
            },
            priority: 0,
            arrival_time: Instant::now(),
        }
    }

    /// The worker's answer to a step as the protocol defines it: a token
    /// (always 100) for each request whose known tokens are all computed.
    fn answer(s: &Scheduler, step: &SchedulerOutput) -> ModelRunnerOutput {
        let mut out = ModelRunnerOutput::default();
        for (id, _) in &step.num_scheduled_tokens {
            let r = s.request(id).unwrap();
            out.req_ids.push(id.clone());
            let done = r.num_computed_tokens == r.num_tokens();
            out.sampled_token_ids.push(done.then_some(100));
            out.logprobs.push(None);
            out.prompt_logprobs.push(Vec::new());
        }
        out
    }

    fn step(s: &mut Scheduler) -> (SchedulerOutput, Vec<RequestUpdate>) {
        let o = s.schedule();
        let a = answer(s, &o);
        let u = s.update_from_output(&o, &a);
        (o, u)
    }

    fn counts(o: &SchedulerOutput) -> Vec<(&str, usize)> {
        o.num_scheduled_tokens
            .iter()
            .map(|(r, n)| (r.as_str(), *n))
            .collect()
    }

    /// (max_num_seqs, budget, prompt lengths, expected first step)
    type BudgetCase = (usize, usize, Vec<usize>, Vec<(&'static str, usize)>);

    /// Pooling prompts run whole (never chunked), as many per step as the
    /// token budget and max_num_seqs allow, and finish with their vectors.
    #[test]
    fn pooling_prompts_batch_whole() {
        let config = SchedulerConfig {
            max_num_seqs: 3,
            max_num_batched_tokens: 10,
            max_model_len: 10,
            policy: SchedulingPolicy::Fcfs,
            pooling: true,
        };
        let mut s = Scheduler::new(config, BlockManager::new(100, 4, false), vec![]);
        for (id, len) in [("a", 4), ("b", 5), ("c", 3), ("d", 2), ("e", 1), ("f", 1)] {
            s.add_request(req(id, len, 1));
        }
        let pooled_answer = |step: &SchedulerOutput| {
            let mut out = ModelRunnerOutput::default();
            for (id, n) in &step.num_scheduled_tokens {
                out.req_ids.push(id.clone());
                out.sampled_token_ids.push(None);
                out.logprobs.push(None);
                out.prompt_logprobs.push(Vec::new());
                out.pooled.push(Some(vec![*n as f32]));
            }
            out
        };
        let mut batches = Vec::new();
        while s.has_unfinished() {
            let o = s.schedule();
            assert!(o.cached_requests.is_empty());
            for r in &o.new_requests {
                assert_eq!(r.num_computed_tokens, 0);
            }
            let sizes: Vec<(String, usize)> = o.num_scheduled_tokens.clone();
            let updates = s.update_from_output(&o, &pooled_answer(&o));
            for u in &updates {
                let whole = sizes.iter().find(|(id, _)| *id == u.request_id).unwrap().1;
                assert_eq!(u.pooled, Some(vec![whole as f32]));
                assert_eq!(u.finished, Some(FinishReason::Stop(StopMatch::Eos)));
                assert_eq!(u.num_prompt_tokens, whole);
            }
            batches.push(sizes);
        }
        let ids = |b: &Vec<(String, usize)>| b.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>();
        // 4 + 5 fill the budget of 10 (c's 3 would not fit, and is not
        // chunked); then c, d, e is max_num_seqs; then f.
        assert_eq!(
            batches.iter().map(ids).collect::<Vec<_>>(),
            vec![vec!["a", "b"], vec!["c", "d", "e"], vec!["f"]]
        );
        assert_eq!(s.stats().num_free_blocks, 100);
    }

    #[test]
    fn token_budget_and_max_num_seqs() {
        let cases: Vec<BudgetCase> = vec![
            (8, 16, vec![10, 10, 10], vec![("r0", 10), ("r1", 6)]),
            (
                8,
                100,
                vec![10, 10, 10],
                vec![("r0", 10), ("r1", 10), ("r2", 10)],
            ),
            (2, 100, vec![10, 10, 10], vec![("r0", 10), ("r1", 10)]),
            (8, 5, vec![3, 3], vec![("r0", 3), ("r1", 2)]),
        ];
        for (seqs, budget, prompts, want) in cases {
            let mut s = sched(seqs, budget, 100, SchedulingPolicy::Fcfs);
            for (i, p) in prompts.iter().enumerate() {
                s.add_request(req(&format!("r{i}"), *p, 4));
            }
            let o = s.schedule();
            assert_eq!(counts(&o), want, "seqs={seqs} budget={budget}");
            assert!(o.total_num_scheduled_tokens() <= budget);
            assert!(o.num_scheduled_tokens.len() <= seqs);
        }
    }

    /// Two steps in flight (pipeline stages): each takes a share of the
    /// requests, a request whose token is still in flight is not scheduled
    /// again, and decodes carry the sampled token to the stages.
    #[test]
    fn steps_in_flight_share_requests_and_carry_new_tokens() {
        let mut s = sched(8, 100, 100, SchedulingPolicy::Fcfs);
        for i in 0..4 {
            s.add_request(req(&format!("r{i}"), 3, 4));
        }
        let first = s.schedule_at_most(2);
        assert_eq!(counts(&first), vec![("r0", 3), ("r1", 3)]);
        // r0 and r1 wait for their tokens: the second step takes the others.
        let second = s.schedule_at_most(2);
        assert_eq!(counts(&second), vec![("r2", 3), ("r3", 3)]);
        assert!(s.schedule_at_most(2).is_empty(), "everything is in flight");
        let a = answer(&s, &first);
        s.update_from_output(&first, &a);
        let third = s.schedule_at_most(2);
        assert_eq!(counts(&third), vec![("r0", 1), ("r1", 1)]);
        // The token sampled in the first step, for stages that never sample.
        assert_eq!(third.cached_requests[0].new_token_ids, vec![100]);
        assert_eq!(third.cached_requests[0].num_computed_tokens, 3);
    }

    #[test]
    fn chunked_prefill_mixes_with_decodes() {
        let mut s = sched(8, 16, 100, SchedulingPolicy::Fcfs);
        s.add_request(req("a", 4, 10));
        let (o, u) = step(&mut s);
        assert_eq!(counts(&o), vec![("a", 4)]);
        assert_eq!(u[0].new_token_ids, vec![100]);

        let mut b = req("b", 30, 10);
        // Tokens unlike a's, so no prefix-cache hit.
        b.prompt_token_ids = (201..231).collect();
        s.add_request(b);
        let (o, u) = step(&mut s);
        // a decodes one token, b's prompt takes the rest of the budget.
        assert_eq!(counts(&o), vec![("a", 1), ("b", 15)]);
        assert_eq!(o.new_requests.len(), 1);
        assert_eq!(o.new_requests[0].block_ids.len(), 4);
        assert!(
            u[1].new_token_ids.is_empty(),
            "partial prefill samples nothing"
        );

        let (o, u) = step(&mut s);
        assert_eq!(counts(&o), vec![("a", 1), ("b", 15)]);
        assert_eq!(o.cached_requests[1].num_computed_tokens, 15);
        assert_eq!(u[1].new_token_ids, vec![100], "last chunk samples");

        let (o, _) = step(&mut s);
        assert_eq!(counts(&o), vec![("a", 1), ("b", 1)]);
    }

    #[test]
    fn requests_finish_on_max_tokens_and_eos() {
        let mut s = sched(8, 64, 100, SchedulingPolicy::Fcfs);
        s.add_request(req("a", 4, 2));
        let mut b = req("b", 4, 5);
        b.sampling_params.stop_token_ids = vec![100];
        s.add_request(b);
        assert_eq!(
            s.request("b").unwrap().sampling_params.all_stop_token_ids,
            vec![EOS, 100]
        );
        let (_, u) = step(&mut s);
        assert_eq!(
            u[1].finished,
            Some(FinishReason::Stop(StopMatch::TokenId(100)))
        );
        let (o, u) = step(&mut s);
        assert_eq!(o.finished_req_ids, vec!["b".to_string()]);
        assert_eq!(u[0].finished, Some(FinishReason::Length));
        assert_eq!(u[0].num_output_tokens, 2);
        assert!(!s.has_unfinished());
        assert_eq!(s.stats().num_free_blocks, 100);
    }

    #[test]
    fn preemption_when_blocks_run_out_and_readmission() {
        // 5 blocks of 4 tokens; two 6-token prompts take 2 blocks each.
        let mut s = sched(8, 64, 5, SchedulingPolicy::Fcfs);
        s.add_request(req("a", 6, 4));
        s.add_request(req("b", 6, 8));
        for _ in 0..3 {
            step(&mut s); // up to 9 tokens each, 8 computed: still 2 blocks
        }
        // a takes the last free block; b (the latest) finds none and is preempted.
        let o = s.schedule();
        assert_eq!(counts(&o), vec![("a", 1)]);
        assert_eq!(o.finished_req_ids, vec!["b".to_string()]);
        let st = s.stats();
        assert_eq!(
            (st.num_preemptions, st.num_running, st.num_waiting),
            (1, 1, 1)
        );
        assert_eq!(s.request("b").unwrap().status, RequestStatus::Preempted);
        let a = answer(&s, &o);
        let u = s.update_from_output(&o, &a);
        assert_eq!(u[0].finished, Some(FinishReason::Length));

        // b comes back as a new request carrying its output so far; its two
        // full blocks were cached when computed, so they hit.
        let (o, _) = step(&mut s);
        let n = &o.new_requests[0];
        assert_eq!(n.req_id, "b");
        assert_eq!(n.output_token_ids, vec![100, 100, 100]);
        assert_eq!(n.prompt_token_ids.len(), 6);
        assert_eq!(n.num_computed_tokens, 8);
        assert_eq!(counts(&o), vec![("b", 1)]);
        while s.has_unfinished() {
            step(&mut s);
        }
        assert_eq!(s.stats().num_free_blocks, 5);
    }

    #[test]
    fn priority_policy_orders_admission_and_preemption() {
        let mut s = sched(1, 64, 100, SchedulingPolicy::Priority);
        let now = Instant::now();
        for (id, prio, age) in [("low", 5, 3), ("high", -1, 1), ("mid", 0, 2)] {
            let mut r = req(id, 4, 3);
            r.priority = prio;
            r.arrival_time = now - Duration::from_secs(age);
            s.add_request(r);
        }
        let mut order = Vec::new();
        while s.has_unfinished() {
            let (o, _) = step(&mut s);
            for n in &o.new_requests {
                order.push(n.req_id.clone());
            }
        }
        assert_eq!(order, vec!["high", "mid", "low"]);

        // Preemption takes the lowest priority (highest value), not the latest.
        let mut s = sched(8, 64, 4, SchedulingPolicy::Priority);
        let mut a = req("a", 6, 20);
        a.priority = 9;
        s.add_request(a);
        s.add_request(req("b", 6, 20));
        for _ in 0..3 {
            step(&mut s);
        }
        let (o, _) = step(&mut s);
        assert_eq!(o.finished_req_ids, vec!["a".to_string()]);
        assert_eq!(counts(&o), vec![("b", 1)]);
    }

    #[test]
    fn abort_frees_blocks_at_once() {
        let mut s = sched(8, 64, 10, SchedulingPolicy::Fcfs);
        s.add_request(req("a", 9, 20));
        s.add_request(req("w", 9, 20));
        s.config.max_num_seqs = 1;
        step(&mut s);
        assert_eq!(s.stats().num_free_blocks, 7);
        let r = s.finish_request("a", &FinishReason::Abort).unwrap();
        assert_eq!(r.status, RequestStatus::FinishedAborted);
        assert_eq!(s.stats().num_free_blocks, 10);
        // A waiting request is dropped too; the worker hears only of "a".
        s.finish_request("w", &FinishReason::Abort).unwrap();
        assert!(!s.has_unfinished());
        // Nothing to run: the finished id waits for the next real step.
        let o = s.schedule();
        assert!(o.is_empty() && o.finished_req_ids.is_empty());
        s.add_request(req("b", 3, 1));
        let o = s.schedule();
        assert_eq!(o.finished_req_ids, vec!["a".to_string()]);
        assert_eq!(counts(&o), vec![("b", 3)]);
        assert!(s.finish_request("a", &FinishReason::Abort).is_none());
    }

    #[test]
    fn prefix_hit_skips_computed_tokens() {
        let mut s = sched(8, 64, 20, SchedulingPolicy::Fcfs);
        s.add_request(req("a", 10, 1));
        step(&mut s);
        s.add_request(req("b", 10, 1));
        let (o, u) = step(&mut s);
        assert_eq!(o.new_requests[0].num_computed_tokens, 8);
        assert_eq!(counts(&o), vec![("b", 2)]);
        assert_eq!(u[0].num_cached_tokens, 8);
        let st = s.stats();
        assert_eq!((st.prefix_cache_queries, st.prefix_cache_hits), (20, 8));
    }
}
