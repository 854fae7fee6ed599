//! The CUDA backend against the CPU backend on the same inputs: every op
//! (random shapes, odd lengths, block sizes 16 and 32, prefix hits, mixed
//! prefill/decode batches, GQA groups of 1 to 7, head sizes 64, 80 and 128),
//! then whole model steps through the model runner. Built only with
//! `--features cuda`; without a visible GPU every test prints SKIP and
//! passes, so this is the GPU test command run on the device machine:
//! `cargo test -p flotilla-worker --features cuda --test cuda_backend`.
#![cfg(feature = "cuda")]

use candle_core::{Device as CDevice, Tensor};
use serde_json::json;
use worker::attention::{AttentionMetadata, QkvHeads};
use worker::backend::cuda::{AttentionKernel, CudaBackend, KernelChoice, LinearKernel};
use worker::backend::{Backend, ComputeDtype, CpuBackend, StepInputs};
use worker::kv_cache::KvCacheSpec;
use worker::loader::{HostLinear, HostMatrix, WeightSource};
use worker::parallel::Shard;
use worker::rope::RopeTable;
use worker::{
    CachedRequestData, Device, LoadFormat, ModelConfig, ModelRunner, ModelRunnerOutput,
    NewRequestData, ParallelConfig, SamplingParams, SchedulerOutput, WorkerConfig,
};

fn gpu_present() -> bool {
    match worker::backend::cuda_device_count() {
        Ok(n) if n > 0 => true,
        other => {
            eprintln!("SKIP: no CUDA device ({other:?})");
            false
        }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| scale * self.next()).collect()
    }
}

fn dense(v: Vec<f32>, rows: usize, cols: usize) -> HostMatrix {
    HostMatrix::Dense(Tensor::from_vec(v, (rows, cols), &CDevice::Cpu).unwrap())
}

/// ‖a − b‖ / ‖b‖, with NaN failing.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        assert!(x.is_finite() && y.is_finite(), "non-finite value {x} / {y}");
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num.sqrt() / den.sqrt().max(1e-30)) as f32
}

/// One attention scenario: sequences (cached context, new tokens) in a
/// mixed batch, with shuffled block tables.
struct Case {
    heads: QkvHeads,
    block_size: usize,
    /// (tokens already in the cache, tokens in this step) per sequence.
    seqs: Vec<(usize, usize)>,
}

/// Metadata for running `rows(s)` of each sequence; block tables come from
/// one shuffled pool so sequences interleave in the cache.
fn metadata(
    case: &Case,
    tables: &[Vec<u32>],
    rows: impl Fn(usize) -> (usize, usize),
) -> AttentionMetadata {
    let bs = case.block_size;
    let mut m = AttentionMetadata::default();
    let max_blocks = tables.iter().map(|t| t.len()).max().unwrap();
    m.max_blocks_per_seq = max_blocks;
    m.query_start_loc.push(0);
    for (s, table) in tables.iter().enumerate() {
        let (start, end) = rows(s);
        for pos in start..end {
            m.positions.push(pos as u32);
            m.slot_mapping
                .push(table[pos / bs] as usize * bs + pos % bs);
        }
        m.query_start_loc.push(m.positions.len());
        m.seq_lens.push(end);
        let mut t = table.clone();
        t.resize(max_blocks, 0);
        m.block_tables.extend(t);
    }
    m
}

/// NVRTC needs no GPU: wherever libnvrtc can be opened (CI installs it from
/// PyPI's `nvidia-cuda-nvrtc-cu12`), the kernels must compile for Hopper, so
/// a kernel that does not compile shows before the GPU machine.
#[test]
fn kernels_compile_without_a_gpu() {
    // SAFETY: only probes whether the library can be opened.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        eprintln!("SKIP: libnvrtc not found (scripts/nvrtc-lib-dir prints where pip put it)");
        return;
    }
    let bytes = worker::backend::cuda::compile_kernels((9, 0)).unwrap();
    assert!(bytes > 1000, "the sm_90 cubin is {bytes} bytes");
}

/// KV blocks the op scenarios share (enough for 600-token contexts).
const POOL_BLOCKS: usize = 128;

/// Runs the ops on backend `b` and returns each op's output by name.
fn run_ops<B: Backend>(b: &B, case: &Case, seed: u64) -> Vec<(&'static str, Vec<f32>)> {
    let mut rng = Rng(seed);
    let h = case.heads;
    let hidden = 96;
    let bs = case.block_size;
    // Block tables: a shuffled pool of block ids.
    let mut pool: Vec<u32> = (0..POOL_BLOCKS as u32).collect();
    for i in (1..pool.len()).rev() {
        let j = ((rng.next() + 1.0) * 0.5 * (i + 1) as f32) as usize % (i + 1);
        pool.swap(i, j);
    }
    let mut next = 0;
    let tables: Vec<Vec<u32>> = case
        .seqs
        .iter()
        .map(|&(c, n)| {
            let nb = (c + n).div_ceil(bs);
            let t = pool[next..next + nb].to_vec();
            next += nb;
            t
        })
        .collect();
    let spec = KvCacheSpec {
        num_layers: 1,
        num_kv_heads: h.num_kv_heads,
        head_dim: h.head_dim,
        block_size: bs,
        dtype_bytes: b.kv_dtype_bytes(),
    };
    let mut kv = b.alloc_kv_cache(spec, POOL_BLOCKS).unwrap();
    let cfg = ModelConfig::from_hf_json(&json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": h.num_heads * h.head_dim,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": h.num_heads,
        "num_key_value_heads": h.num_kv_heads, "head_dim": h.head_dim, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 1024
    }))
    .unwrap();
    let rope = b.upload_rope(RopeTable::new(&cfg, 1024)).unwrap();
    let mut out = Vec::new();

    // History: the cached tokens' K/V, written by an earlier step.
    let hist = metadata(case, &tables, |s| (0, case.seqs[s].0));
    let n_hist = hist.num_tokens();
    if n_hist > 0 {
        let table = b
            .upload_embedding(
                &dense(rng.vec(n_hist * h.qkv_width(), 1.0), n_hist, h.qkv_width()),
                0,
            )
            .unwrap();
        let ids: Vec<u32> = (0..n_hist as u32).collect();
        let step = b
            .prepare_step(
                StepInputs {
                    input_ids: &ids,
                    meta: &hist,
                    logits_rows: &[],
                },
                &rope,
            )
            .unwrap();
        let mut qkv = b.embed(&table, &step).unwrap();
        b.rotary(&mut qkv, h, &step, &rope).unwrap();
        b.write_kv(&mut kv, 0, &qkv, h, &step).unwrap();
    }

    // This step: the mixed batch.
    let meta = metadata(case, &tables, |s| {
        let (c, n) = case.seqs[s];
        (c, c + n)
    });
    let n = meta.num_tokens();
    let ids: Vec<u32> = (0..n as u32).collect();
    let logits_rows: Vec<usize> = (0..n).rev().step_by(2).collect();
    let step = b
        .prepare_step(
            StepInputs {
                input_ids: &ids,
                meta: &meta,
                logits_rows: &logits_rows,
            },
            &rope,
        )
        .unwrap();
    let qkv_table = b
        .upload_embedding(&dense(rng.vec(n * h.qkv_width(), 1.0), n, h.qkv_width()), 0)
        .unwrap();
    let mut qkv = b.embed(&qkv_table, &step).unwrap();
    out.push(("embed", b.to_host(&qkv).unwrap()));
    b.rotary(&mut qkv, h, &step, &rope).unwrap();
    out.push(("rotary", b.to_host(&qkv).unwrap()));
    b.write_kv(&mut kv, 0, &qkv, h, &step).unwrap();
    let attn = b.attention(&kv, 0, &qkv, h, &step, 0.125).unwrap();
    out.push(("attention", b.to_host(&attn).unwrap()));
    out.push((
        "gather_logits_rows",
        b.to_host(&b.gather_logits_rows(&attn, &step).unwrap())
            .unwrap(),
    ));

    // Dense ops on [n, hidden] activations.
    let x_table = b
        .upload_embedding(&dense(rng.vec(n * hidden, 2.0), n, hidden), 0)
        .unwrap();
    let x = b.embed(&x_table, &step).unwrap();
    let parts = vec![
        HostLinear {
            weight: dense(rng.vec(40 * hidden, 0.2), 40, hidden),
            bias: Some(rng.vec(40, 0.5)),
        },
        HostLinear {
            weight: dense(rng.vec(24 * hidden, 0.2), 24, hidden),
            bias: None,
        },
    ];
    let lin = b.upload_linear(parts).unwrap();
    let y = b.linear(&x, &lin).unwrap();
    out.push(("linear", b.to_host(&y).unwrap()));
    out.push(("silu_mul", b.to_host(&b.silu_mul(&y).unwrap()).unwrap()));
    let w = b.upload_vector(rng.vec(hidden, 1.0)).unwrap();
    out.push((
        "rms_norm",
        b.to_host(&b.rms_norm(&x, &w, 1e-5).unwrap()).unwrap(),
    ));
    let mut residual = b.embed(&x_table, &step).unwrap();
    let x2_table = b
        .upload_embedding(&dense(rng.vec(n * hidden, 1.0), n, hidden), 0)
        .unwrap();
    let x2 = b.embed(&x2_table, &step).unwrap();
    let normed = b.add_rms_norm(&mut residual, &x2, &w, 1e-5).unwrap();
    out.push(("add_rms_norm", b.to_host(&normed).unwrap()));
    out.push(("add_rms_norm residual", b.to_host(&residual).unwrap()));
    // Vocab-parallel embedding: ids outside this rank's rows give zeros.
    let shard = b
        .upload_embedding(&dense(rng.vec(5 * hidden, 1.0), 5, hidden), 3)
        .unwrap();
    out.push((
        "embed shard",
        b.to_host(&b.embed(&shard, &step).unwrap()).unwrap(),
    ));
    out
}

fn compare_ops(dtype: ComputeDtype, tol: f32) {
    if !gpu_present() {
        return;
    }
    let cuda = CudaBackend::new(0, dtype).unwrap();
    let cpu = CpuBackend::new(dtype);
    let cases = [
        // GQA group 4, head 64: a prefill of 7, a decode after 20 cached, a
        // chunk of 5 after 33 cached (prefix hit), a decode after 1.
        Case {
            heads: QkvHeads {
                num_heads: 8,
                num_kv_heads: 2,
                head_dim: 64,
            },
            block_size: 16,
            seqs: vec![(0, 7), (20, 1), (33, 5), (1, 1)],
        },
        Case {
            heads: QkvHeads {
                num_heads: 8,
                num_kv_heads: 2,
                head_dim: 64,
            },
            block_size: 32,
            seqs: vec![(0, 45), (70, 1), (31, 2)],
        },
        // No grouping, odd head size.
        Case {
            heads: QkvHeads {
                num_heads: 3,
                num_kv_heads: 3,
                head_dim: 80,
            },
            block_size: 16,
            seqs: vec![(0, 13), (17, 1), (5, 9)],
        },
        // Group of 7, head 128 (Qwen2-7B's shape per rank).
        Case {
            heads: QkvHeads {
                num_heads: 7,
                num_kv_heads: 1,
                head_dim: 128,
            },
            block_size: 16,
            seqs: vec![(0, 3), (100, 1), (64, 33)],
        },
        // Decodes over long contexts split them over several blocks (128
        // keys each for the tiled kernel, 256 for the lane-per-key one: 5 / 3
        // and 3 / 2 splits, and around both boundaries), beside a prefill
        // that does not.
        Case {
            heads: QkvHeads {
                num_heads: 8,
                num_kv_heads: 2,
                head_dim: 128,
            },
            block_size: 16,
            seqs: vec![(600, 1), (0, 9), (256, 1), (255, 1), (127, 1), (128, 1)],
        },
        // Group of 9 (beyond the lane-per-key kernel's 8: the tiled kernel).
        Case {
            heads: QkvHeads {
                num_heads: 9,
                num_kv_heads: 1,
                head_dim: 64,
            },
            block_size: 16,
            seqs: vec![(0, 11), (40, 1), (300, 1)],
        },
        // Head size 256, no grouping, a long prefill chunk after a prefix.
        Case {
            heads: QkvHeads {
                num_heads: 2,
                num_kv_heads: 2,
                head_dim: 256,
            },
            block_size: 32,
            seqs: vec![(0, 5), (270, 1), (96, 70)],
        },
    ];
    // Every case through both attention kernels (`Lanes` falls back to
    // `Tiled` where the shape needs it).
    for kernel in [AttentionKernel::Tiled, AttentionKernel::Lanes] {
        let mut cuda = cuda.clone();
        cuda.set_kernels(KernelChoice {
            attention: kernel,
            ..KernelChoice::default()
        });
        for (i, case) in cases.iter().enumerate() {
            let a = run_ops(&cuda, case, 11 + i as u64);
            let e = run_ops(&cpu, case, 11 + i as u64);
            for ((name, got), (_, want)) in a.iter().zip(&e) {
                let err = rel_err(got, want);
                eprintln!("{dtype:?} {kernel:?} case {i} {name}: rel err {err:.2e}");
                assert!(
                    err <= tol,
                    "{dtype:?} {kernel:?} case {i} {name}: rel err {err} > {tol}"
                );
            }
        }
    }
}

#[test]
fn ops_match_cpu_f32() {
    compare_ops(ComputeDtype::F32, 2e-5);
}

// One bf16 ulp is 2^-8 of a value: ops that round at a different point, or
// accumulate in another order, differ by about that much in some elements.
#[test]
fn ops_match_cpu_bf16() {
    compare_ops(ComputeDtype::Bf16, 1e-2);
}

#[test]
fn ops_match_cpu_f16() {
    compare_ops(ComputeDtype::F16, 2e-3);
}

// ---------------------------------------------------------------------------
// Whole steps through the model runner.

fn model_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("flotilla-cuda-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // SmolLM2-135M's shapes with 4 layers (9 query / 3 kv heads, head 64).
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 9,
        "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "max_position_embeddings": 2048, "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

fn runner(dir: &std::path::Path, device: Device, dtype: &str, block_size: usize) -> ModelRunner {
    ModelRunner::load(&WorkerConfig {
        device,
        model: dir.to_path_buf(),
        load_format: LoadFormat::Dummy,
        dtype: dtype.into(),
        hf_overrides: serde_json::Value::Null,
        block_size,
        parallel: ParallelConfig::default(),
        seed: 7,
        max_model_len: 2048,
        cpu_int8_activations: false,
        pooling: None,
    })
    .unwrap()
}

fn params(logprobs: usize) -> SamplingParams {
    SamplingParams {
        logprobs: Some(logprobs),
        prompt_logprobs: Some(2),
        ..SamplingParams::greedy()
    }
}

/// A scenario over several steps: a long prompt prefilled in two chunks,
/// short prompts, a request sharing the first's prefix blocks (prefix hit),
/// then decodes of all of them together.
fn scenario(r: &mut dyn StepExec, bs: usize) -> Vec<ModelRunnerOutput> {
    let prompt_a: Vec<u32> = (0..75).map(|i| (i * 811 + 17) % 49152).collect();
    let prompt_b: Vec<u32> = vec![5, 900, 31000, 4];
    // c shares a's first two blocks (prefix-cache hit), then diverges.
    let mut prompt_c: Vec<u32> = prompt_a[..2 * bs].to_vec();
    prompt_c.extend([77, 78, 79]);
    let blocks = |start: u32, n: usize| (start..start + n as u32).collect::<Vec<u32>>();
    let mut outs = Vec::new();
    let new = |id: &str, p: &[u32], b: Vec<u32>, computed: usize| NewRequestData {
        req_id: id.into(),
        prompt_token_ids: p.to_vec(),
        output_token_ids: vec![],
        sampling_params: params(5),
        block_ids: b,
        num_computed_tokens: computed,
    };
    // Step 1: a's first chunk (40 tokens) and b whole.
    outs.push(r.exec(&SchedulerOutput {
        new_requests: vec![
            new("a", &prompt_a, blocks(0, 6), 0),
            new("b", &prompt_b, blocks(10, 1), 0),
        ],
        num_scheduled_tokens: vec![("a".into(), 40), ("b".into(), 4)],
        ..Default::default()
    }));
    // Step 2: the rest of a, b decodes, c arrives with a's first blocks cached.
    let mut c_blocks = blocks(0, 2);
    c_blocks.extend(blocks(20, 2));
    outs.push(r.exec(&SchedulerOutput {
        new_requests: vec![new("c", &prompt_c, c_blocks, 2 * bs)],
        cached_requests: vec![
            CachedRequestData {
                new_token_ids: Vec::new(),
                req_id: "a".into(),
                new_block_ids: vec![],
                num_computed_tokens: 40,
            },
            CachedRequestData {
                new_token_ids: Vec::new(),
                req_id: "b".into(),
                new_block_ids: vec![],
                num_computed_tokens: 4,
            },
        ],
        num_scheduled_tokens: vec![("a".into(), 35), ("b".into(), 1), ("c".into(), 3)],
        ..Default::default()
    }));
    // Decodes.
    let mut computed = [75usize, 5, 2 * bs + 3];
    for _ in 0..6 {
        let out = r.exec(&SchedulerOutput {
            cached_requests: ["a", "b", "c"]
                .iter()
                .zip(computed)
                .map(|(id, c)| CachedRequestData {
                    new_token_ids: Vec::new(),
                    req_id: (*id).into(),
                    new_block_ids: vec![],
                    num_computed_tokens: c,
                })
                .collect(),
            num_scheduled_tokens: vec![("a".into(), 1), ("b".into(), 1), ("c".into(), 1)],
            ..Default::default()
        });
        for c in computed.iter_mut() {
            *c += 1;
        }
        outs.push(out);
    }
    outs
}

/// Greedy tokens equal, except at a near tie: where they differ, the
/// reference's logprobs of the two tokens are within `tol`. Logprobs within
/// `tol`. Returns the largest logprob difference seen.
fn compare_outputs(got: &[ModelRunnerOutput], want: &[ModelRunnerOutput], tol: f32) -> f32 {
    let mut max_diff = 0f32;
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.req_ids, w.req_ids);
        for i in 0..g.req_ids.len() {
            let (gt, wt) = (g.sampled_token_ids[i], w.sampled_token_ids[i]);
            if let (Some(gl), Some(wl)) = (&g.logprobs[i], &w.logprobs[i]) {
                if gt != wt {
                    let alt = wl.top.iter().find(|(t, _)| Some(*t) == gt).map(|(_, l)| *l);
                    let gap = alt.map(|a| (wl.logprob - a).abs());
                    assert!(
                        gap.is_some_and(|d| d <= tol),
                        "{}: token {gt:?} vs {wt:?} is no near tie ({gap:?})",
                        g.req_ids[i]
                    );
                    // The sequences diverge here; later steps are not comparable.
                    return max_diff;
                }
                let d = (gl.logprob - wl.logprob).abs();
                max_diff = max_diff.max(d);
                for ((ta, la), (tb, lb)) in gl.top.iter().zip(&wl.top) {
                    if ta == tb {
                        max_diff = max_diff.max((la - lb).abs());
                    }
                }
            }
            // Prompt logprobs: the GPU computes them where the logits are
            // (top_logits and token_ranks), the CPU from whole rows.
            for (pa, pb) in g.prompt_logprobs[i].iter().zip(&w.prompt_logprobs[i]) {
                assert_eq!(pa.token_id, pb.token_id);
                max_diff = max_diff.max((pa.logprob - pb.logprob).abs());
                assert_eq!(pa.top.len(), pb.top.len());
                for ((ta, la), (tb, lb)) in pa.top.iter().zip(&pb.top) {
                    if ta == tb {
                        max_diff = max_diff.max((la - lb).abs());
                    }
                }
                // Ranks may move by a near tie or two in f32. In bf16 the
                // token's logit moves by up to the logprob tolerance, past
                // hundreds of the row's densely packed logits: ranks are
                // not comparable there (`top_logits_match_cpu` checks the
                // rank kernel exactly on shared logits).
                if tol < 0.01 {
                    assert!(
                        pa.rank.abs_diff(pb.rank) <= 2,
                        "prompt token rank {} vs {}",
                        pa.rank,
                        pb.rank
                    );
                }
            }
            assert_eq!(g.prompt_logprobs[i].len(), w.prompt_logprobs[i].len());
        }
    }
    assert!(max_diff <= tol, "max logprob difference {max_diff} > {tol}");
    max_diff
}

/// Something that runs steps: one runner, or a pipeline of stages.
trait StepExec {
    fn exec(&mut self, step: &SchedulerOutput) -> ModelRunnerOutput;
}

impl StepExec for ModelRunner {
    fn exec(&mut self, step: &SchedulerOutput) -> ModelRunnerOutput {
        self.execute_model(step).unwrap()
    }
}

/// Two pipeline stages of one model in this process, joined by a real TCP
/// link, driven as the executor drives worker ranks: every stage gets the
/// same step, with the output tokens the first stage cannot know (it never
/// samples) filled in as the scheduler fills them.
struct Pipeline {
    first: ModelRunner,
    last: ModelRunner,
    /// Per request: prompt length and the tokens sampled so far.
    seen: std::collections::HashMap<String, (usize, Vec<u32>)>,
}

impl Pipeline {
    fn load(dir: &std::path::Path, device: Device, dtype: &str, block_size: usize) -> Self {
        use std::sync::Arc;
        use worker::collective::{StageLink, TcpStageLink};
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let t = std::time::Duration::from_secs(30);
        let (send, recv) = (addr.clone(), addr);
        let first_link =
            std::thread::spawn(move || TcpStageLink::connect(None, Some(&send), t, t).unwrap());
        let last_link = TcpStageLink::connect(Some(&recv), None, t, t).unwrap();
        let first_link = first_link.join().unwrap();
        let stage = |pp_rank: usize, link: TcpStageLink| {
            let link: Arc<dyn StageLink> = Arc::new(link);
            let mut r = ModelRunner::load_rank(
                &WorkerConfig {
                    device,
                    model: dir.to_path_buf(),
                    load_format: LoadFormat::Dummy,
                    dtype: dtype.into(),
                    hf_overrides: serde_json::Value::Null,
                    block_size,
                    parallel: ParallelConfig {
                        pp_rank,
                        pp_size: 2,
                        ..ParallelConfig::default()
                    },
                    seed: 7,
                    max_model_len: 2048,
                    cpu_int8_activations: false,
                    pooling: None,
                },
                None,
                Some(link),
            )
            .unwrap();
            r.initialize_kv_cache(256).unwrap();
            r
        };
        Pipeline {
            first: stage(0, first_link),
            last: stage(1, last_link),
            seen: Default::default(),
        }
    }
}

impl StepExec for Pipeline {
    fn exec(&mut self, step: &SchedulerOutput) -> ModelRunnerOutput {
        for r in &step.new_requests {
            self.seen.insert(
                r.req_id.clone(),
                (r.prompt_token_ids.len(), r.output_token_ids.clone()),
            );
        }
        let mut step = step.clone();
        for c in &mut step.cached_requests {
            let n = step
                .num_scheduled_tokens
                .iter()
                .find(|(id, _)| *id == c.req_id)
                .map_or(0, |(_, n)| *n);
            let (prompt, sampled) = &self.seen[&c.req_id];
            let from = c.num_computed_tokens.max(*prompt) - prompt;
            let to = (c.num_computed_tokens + n).saturating_sub(*prompt);
            c.new_token_ids = sampled.get(from..to).unwrap_or_default().to_vec();
        }
        let (first, last) = (&mut self.first, &mut self.last);
        let out = std::thread::scope(|s| {
            let f = s.spawn(|| first.execute_model(&step).unwrap());
            let out = last.execute_model(&step).unwrap();
            let f = f.join().unwrap();
            assert!(
                f.sampled_token_ids.iter().all(Option::is_none),
                "only the last stage samples"
            );
            out
        });
        for (id, t) in out.req_ids.iter().zip(&out.sampled_token_ids) {
            if let (Some(t), Some((_, sampled))) = (t, self.seen.get_mut(id)) {
                sampled.push(*t);
            }
        }
        out
    }
}

/// Two pipeline stages against one runner on `device`: the same tokens, and
/// logprobs within `tol` (the stages' boundary rounds to the dtype once, as
/// vLLM's does).
fn compare_pipeline(device: Device, dtype: &str, tol: f32) {
    let dir = model_dir(&format!("pp-{}-{dtype}", device.name()));
    let mut one = runner(&dir, device, dtype, 16);
    one.initialize_kv_cache(256).unwrap();
    let mut stages = Pipeline::load(&dir, device, dtype, 16);
    let want = scenario(&mut one, 16);
    let got = scenario(&mut stages, 16);
    let d = compare_outputs(&got, &want, tol);
    eprintln!(
        "pipeline of 2 on {} ({dtype}): max logprob diff vs one runner {d:.2e}",
        device.name()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The harness itself, on the CPU (runs wherever this file builds, CI
/// included): a failure of the CUDA test below then points at CUDA.
#[test]
fn pipeline_stages_match_one_runner_cpu() {
    compare_pipeline(Device::Cpu, "float32", 1e-5);
}

#[test]
fn pipeline_stages_match_one_runner_cuda() {
    if !gpu_present() {
        return;
    }
    compare_pipeline(Device::Cuda, "float32", 1e-3);
    compare_pipeline(Device::Cuda, "bfloat16", 0.1);
}

fn compare_runner(dtype: &str, bs: usize, tol: f32) {
    if !gpu_present() {
        return;
    }
    let dir = model_dir(&format!("{dtype}-{bs}"));
    let mut gpu = runner(&dir, Device::Cuda, dtype, bs);
    assert_eq!(gpu.device(), Device::Cuda);
    let mut cpu = runner(&dir, Device::Cpu, dtype, bs);
    gpu.initialize_kv_cache(256).unwrap();
    cpu.initialize_kv_cache(256).unwrap();
    let got = scenario(&mut gpu, bs);
    let want = scenario(&mut cpu, bs);
    let d = compare_outputs(&got, &want, tol);
    eprintln!("runner {dtype} block {bs}: max logprob diff vs CPU {d:.2e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn runner_matches_cpu_f32_block16() {
    compare_runner("float32", 16, 1e-3);
}

#[test]
fn runner_matches_cpu_f32_block32() {
    compare_runner("float32", 32, 1e-3);
}

#[test]
fn runner_matches_cpu_bf16_block16() {
    compare_runner("bfloat16", 16, 0.1);
}

/// Greedy decoding of `prompts` together for `steps` tokens each (one
/// prefill step, then decode steps of every request), over blocks from
/// `first_block` on, `blocks_per` per request; finishes them after.
fn greedy_run(
    r: &mut ModelRunner,
    prompts: &[Vec<u32>],
    first_block: usize,
    blocks_per: usize,
    steps: usize,
) -> Vec<Vec<u32>> {
    let id = |k: usize| format!("r{}", first_block + k);
    let mut toks: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut computed: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let first = r
        .execute_model(&SchedulerOutput {
            new_requests: prompts
                .iter()
                .enumerate()
                .map(|(k, p)| NewRequestData {
                    req_id: id(k),
                    prompt_token_ids: p.clone(),
                    output_token_ids: vec![],
                    sampling_params: SamplingParams::greedy(),
                    block_ids: (0..blocks_per)
                        .map(|b| (first_block + k * blocks_per + b) as u32)
                        .collect(),
                    num_computed_tokens: 0,
                })
                .collect(),
            num_scheduled_tokens: prompts
                .iter()
                .enumerate()
                .map(|(k, p)| (id(k), p.len()))
                .collect(),
            ..Default::default()
        })
        .unwrap();
    for (k, t) in first.sampled_token_ids.iter().enumerate() {
        toks[k].push(t.unwrap());
    }
    for _ in 1..steps {
        let out = r
            .execute_model(&SchedulerOutput {
                cached_requests: computed
                    .iter()
                    .enumerate()
                    .map(|(k, &c)| CachedRequestData {
                        new_token_ids: Vec::new(),
                        req_id: id(k),
                        new_block_ids: vec![],
                        num_computed_tokens: c,
                    })
                    .collect(),
                num_scheduled_tokens: (0..prompts.len()).map(|k| (id(k), 1)).collect(),
                ..Default::default()
            })
            .unwrap();
        for (k, t) in out.sampled_token_ids.iter().enumerate() {
            toks[k].push(t.unwrap());
            computed[k] += 1;
        }
    }
    r.execute_model(&SchedulerOutput {
        finished_req_ids: (0..prompts.len()).map(id).collect(),
        ..Default::default()
    })
    .unwrap();
    toks
}

/// 256 concurrent requests decode the same greedy tokens as each alone,
/// with steps run eagerly and as CUDA graphs (a batch of 256 and one of 1
/// replay different graphs).
#[test]
fn batch_of_256_matches_each_alone() {
    if !gpu_present() {
        return;
    }
    let dir = model_dir("b256");
    const N: usize = 256;
    const STEPS: usize = 8;
    let prompts: Vec<Vec<u32>> = (0..N)
        .map(|i| {
            (0..(3 + i % 13))
                .map(|j| ((i * 131 + j * 7919) % 49152) as u32)
                .collect()
        })
        .collect();
    for graphs in [false, true] {
        let mut r = runner(&dir, Device::Cuda, "bfloat16", 16);
        r.initialize_kv_cache(N * 2 + 8).unwrap();
        if graphs {
            assert!(r.capture_graphs(N).unwrap() > 0);
        }
        let together = greedy_run(&mut r, &prompts, 0, 2, STEPS);
        let mut same = 0;
        for (i, batched) in together.iter().enumerate() {
            let alone = greedy_run(&mut r, &prompts[i..i + 1], 0, 2, STEPS);
            if &alone[0] == batched {
                same += 1;
            } else {
                eprintln!("request {i}: alone {:?} vs batched {batched:?}", alone[0]);
            }
        }
        eprintln!("{same}/{N} requests identical alone and in a batch of {N} (graphs: {graphs})");
        assert_eq!(same, N);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Decode steps replayed as CUDA graphs give the eager steps' tokens:
/// batches padded up to a capture size (3 to 4, 13 to 16), contexts longer
/// than the graphs captured at start cover (captured when first needed),
/// and a KV cache made anew (its graphs captured again).
#[test]
fn graphs_match_eager() {
    if !gpu_present() {
        return;
    }
    let dir = model_dir("graphs");
    const STEPS: usize = 12;
    // Up to 700 + 12 tokens: wider block tables than the start's 512 tokens.
    let prompts: Vec<Vec<u32>> = (0..13)
        .map(|i: usize| {
            let len = [5, 40, 700, 17, 300, 1, 520, 64, 9, 130, 600, 2, 250][i];
            (0..len)
                .map(|j| ((i * 977 + j * 7919 + 3) % 49152) as u32)
                .collect()
        })
        .collect();
    let blocks_per = (700 + STEPS).div_ceil(16);
    let run_all = |r: &mut ModelRunner| -> Vec<Vec<Vec<u32>>> {
        vec![
            greedy_run(r, &prompts[..3], 0, blocks_per, STEPS),
            greedy_run(r, &prompts, 0, blocks_per, STEPS),
            greedy_run(r, &prompts[2..3], 0, blocks_per, STEPS),
        ]
    };
    let mut eager = runner(&dir, Device::Cuda, "bfloat16", 16);
    eager.initialize_kv_cache(13 * blocks_per).unwrap();
    let want = run_all(&mut eager);
    drop(eager);
    let mut r = runner(&dir, Device::Cuda, "bfloat16", 16);
    for round in 0..2 {
        r.initialize_kv_cache(13 * blocks_per + round).unwrap();
        let n = r.capture_graphs(16).unwrap();
        assert_eq!(n, 5, "sizes 1, 2, 4, 8, 16");
        let got = run_all(&mut r);
        for (run, (g, w)) in got.iter().zip(&want).enumerate() {
            for (k, (a, b)) in g.iter().zip(w).enumerate() {
                assert_eq!(
                    a, b,
                    "round {round}, run {run}, request {k}: graphs vs eager"
                );
            }
        }
        eprintln!("round {round}: graph and eager tokens identical");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A [rows, cols] activation holding `v`, made through the embedding op
/// (the trait has no upload of activations).
fn tensor_of<B: Backend>(b: &B, v: &[f32], rows: usize, cols: usize) -> B::Tensor {
    let cfg = ModelConfig::from_hf_json(&json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 64,
        "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
        "num_key_value_heads": 1, "max_position_embeddings": 4
    }))
    .unwrap();
    let rope = b.upload_rope(RopeTable::new(&cfg, 4)).unwrap();
    let meta = AttentionMetadata {
        positions: vec![0; rows],
        slot_mapping: vec![0; rows],
        ..Default::default()
    };
    let ids: Vec<u32> = (0..rows as u32).collect();
    let inputs = StepInputs {
        input_ids: &ids,
        meta: &meta,
        logits_rows: &[],
    };
    let step = b.prepare_step(inputs, &rope).unwrap();
    let table = b
        .upload_embedding(&dense(v.to_vec(), rows, cols), 0)
        .unwrap();
    b.embed(&table, &step).unwrap()
}

fn top_of<B: Backend>(b: &B, v: &[f32], rows: usize, vocab: usize) -> Vec<worker::backend::RowTop> {
    b.top_logits(&tensor_of(b, v, rows, vocab), 21).unwrap()
}

/// Decode-sized batches (1 to 8 rows) at Llama-8B's widths, with and
/// without bias, through cuBLAS and the GEMV kernel: the same results as
/// the CPU backend.
#[test]
fn small_batch_linears_match_cpu() {
    if !gpu_present() {
        return;
    }
    let dtype = ComputeDtype::Bf16;
    let cpu = CpuBackend::new(dtype);
    let mut rng = Rng(5);
    for kernel in [LinearKernel::Blas, LinearKernel::Gemv] {
        let mut cuda = CudaBackend::new(0, dtype).unwrap();
        cuda.set_kernels(KernelChoice {
            small_batch_linear: kernel,
            ..KernelChoice::default()
        });
        // Widths of Llama-8B and SmolLM2 (576), an odd output count, and an
        // input width that is not a multiple of 8 (cuBLAS then, whatever the choice).
        for (inp, out, bias) in [
            (4096, 6144, true),
            (14336, 4096, false),
            (576, 1000, true),
            (100, 33, false),
        ] {
            let w = rng.vec(out * inp, 0.05);
            let b = bias.then(|| rng.vec(out, 1.0));
            let parts = vec![HostLinear {
                weight: dense(w, out, inp),
                bias: b,
            }];
            let lg = cuda.upload_linear(parts.clone()).unwrap();
            let lc = cpu.upload_linear(parts).unwrap();
            for rows in 1..=8 {
                let x = rng.vec(rows * inp, 1.0);
                let yg = cuda
                    .to_host(&cuda.linear(&tensor_of(&cuda, &x, rows, inp), &lg).unwrap())
                    .unwrap();
                let yc = cpu
                    .to_host(&cpu.linear(&tensor_of(&cpu, &x, rows, inp), &lc).unwrap())
                    .unwrap();
                let err = rel_err(&yg, &yc);
                assert!(
                    err < 1e-2,
                    "{kernel:?} [{rows}, {inp}] x [{out}, {inp}]: rel err {err}"
                );
            }
        }
    }
}

/// The device's top-k and log-sum-exp per row equal the host sampler's on
/// the same values, ties (common in bf16) broken by the lower id.
#[test]
fn top_logits_match_cpu() {
    if !gpu_present() {
        return;
    }
    for dtype in [ComputeDtype::Bf16, ComputeDtype::F32] {
        let (rows, vocab) = (37, 50_000);
        // Coarse values make many exact ties.
        let v: Vec<f32> = Rng(99)
            .vec(rows * vocab, 8.0)
            .into_iter()
            .map(|x| (x * 4.0).round() / 4.0)
            .collect();
        let on_gpu = top_of(&CudaBackend::new(0, dtype).unwrap(), &v, rows, vocab);
        let on_cpu = top_of(&CpuBackend::new(dtype), &v, rows, vocab);
        for (r, (g, c)) in on_gpu.iter().zip(&on_cpu).enumerate() {
            assert_eq!(g.top, c.top, "{dtype:?} row {r}");
            let d = (g.log_sum_exp - c.log_sum_exp).abs() / c.log_sum_exp.abs();
            assert!(
                d < 1e-5,
                "{dtype:?} row {r}: lse {} vs {}",
                g.log_sum_exp,
                c.log_sum_exp
            );
        }
        eprintln!("{dtype:?}: top-21 of {rows} rows x {vocab} identical to the host sampler's");
        // Prompt logprobs' ranks: each token's logit and how many of its
        // row exceed it, exactly (ties count as not exceeding).
        let b = CudaBackend::new(0, dtype).unwrap();
        let t = tensor_of(&b, &v, rows, vocab);
        let pairs: Vec<(usize, u32)> = (0..rows)
            .map(|r| (r, ((r * 7919 + 3) % vocab) as u32))
            .chain([(0, 0), (rows - 1, vocab as u32 - 1)])
            .collect();
        let got = b.token_ranks(&t, &pairs).unwrap();
        for (&(r, tok), &(logit, rank)) in pairs.iter().zip(&got) {
            let row = &v[r * vocab..(r + 1) * vocab];
            let want = row[tok as usize];
            assert_eq!(logit, want, "{dtype:?} row {r} token {tok}");
            let above = row.iter().filter(|&&x| x > want).count();
            assert_eq!(rank, above + 1, "{dtype:?} row {r} token {tok}");
        }
        assert!(b.token_ranks(&t, &[(rows, 0)]).is_err());
        assert!(b.token_ranks(&t, &[(0, vocab as u32)]).is_err());
        eprintln!("{dtype:?}: ranks of {} tokens exact", pairs.len());
    }
}

/// Sampling on the device against the host sampler on the same logits and
/// the same uniforms (every request seeded), for each sampling mode: the
/// same tokens, except where float summation order moves a boundary by a
/// rounding step (allowed in at most 2% of rows), the same raw logprobs and
/// ranks, and a row alone samples what it samples in a batch.
#[test]
fn device_sampling_matches_host_sampler() {
    use worker::sampler::{draw_uniform, sample, sample_spec, SamplerState};
    if !gpu_present() {
        return;
    }
    let base = SamplingParams {
        temperature: 1.0,
        seed: Some(7),
        ..Default::default()
    };
    let modes: Vec<(&str, SamplingParams)> = vec![
        (
            "temperature 0.7",
            SamplingParams {
                temperature: 0.7,
                ..base.clone()
            },
        ),
        (
            "top_k 50",
            SamplingParams {
                top_k: 50,
                ..base.clone()
            },
        ),
        (
            "top_p 0.9",
            SamplingParams {
                top_p: 0.9,
                ..base.clone()
            },
        ),
        (
            "top_k 40 + top_p 0.8 + min_p 0.05",
            SamplingParams {
                top_k: 40,
                top_p: 0.8,
                min_p: 0.05,
                ..base.clone()
            },
        ),
        (
            "top_k 1",
            SamplingParams {
                top_k: 1,
                ..base.clone()
            },
        ),
        (
            "greedy + penalties + bias",
            SamplingParams {
                temperature: 0.0,
                seed: None,
                repetition_penalty: 1.3,
                frequency_penalty: 0.5,
                logit_bias: vec![(17, 3.0), (99, -100.0)],
                logprobs: Some(3),
                ..Default::default()
            },
        ),
        (
            "allowed ids + penalties + logprobs",
            SamplingParams {
                temperature: 1.2,
                repetition_penalty: 1.2,
                presence_penalty: 0.5,
                allowed_token_ids: Some((0..3000).step_by(7).collect()),
                logprobs: Some(5),
                ..base.clone()
            },
        ),
        (
            "min_tokens + top_p 0.95 + T 1.5",
            SamplingParams {
                temperature: 1.5,
                top_p: 0.95,
                min_tokens: 10,
                all_stop_token_ids: vec![2, 5, 11],
                logprobs: Some(0),
                ..base.clone()
            },
        ),
    ];
    let (mut total, mut differ) = (0, 0);
    for dtype in [ComputeDtype::Bf16, ComputeDtype::F32] {
        let cuda = CudaBackend::new(0, dtype).unwrap();
        for vocab in [32_000usize, 128_256] {
            let rows = 12;
            let mut rng = Rng(vocab as u64 + 3);
            // Logits with a realistic spread: a few clear favourites over a long tail.
            let v: Vec<f32> = (0..rows * vocab)
                .map(|i| {
                    let x = rng.next();
                    if i % 997 == 0 {
                        12.0 + 4.0 * x
                    } else {
                        3.0 * x
                    }
                })
                .collect();
            let t = tensor_of(&cuda, &v, rows, vocab);
            let host = cuda.to_host(&t).unwrap();
            for (name, p) in &modes {
                let states: Vec<SamplerState> = (0..rows)
                    .map(|r| {
                        let out: Vec<u32> = (0..r as u32 * 3).map(|i| i * 31 % 500).collect();
                        SamplerState::new(p, &[1, 2, 3, 17, 99, 400], &out)
                    })
                    .collect();
                let mut seeds = Vec::new();
                let specs: Vec<_> = (0..rows)
                    .map(|r| {
                        let p = SamplingParams {
                            seed: p.seed.map(|s| s + r as u64),
                            ..p.clone()
                        };
                        let mut unused =
                            <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
                        let u = if p.is_greedy() {
                            0.0
                        } else {
                            draw_uniform(&p, &states[r], &mut unused)
                        };
                        seeds.push(p.clone());
                        sample_spec(&p, &states[r], vocab, r, u)
                    })
                    .collect();
                let got = cuda.sample(&t, &specs).unwrap();
                for r in 0..rows {
                    let mut row = host[r * vocab..(r + 1) * vocab].to_vec();
                    let mut unused = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
                    let want = sample(&mut row, &seeds[r], &states[r], &mut unused);
                    total += 1;
                    if want.token != got[r].token {
                        differ += 1;
                        eprintln!(
                            "{dtype:?} vocab {vocab} {name} row {r}: device {} host {}",
                            got[r].token, want.token
                        );
                        continue;
                    }
                    if let Some(lp) = want.logprobs {
                        let dl = got[r].logit - got[r].log_sum_exp;
                        assert!(
                            (dl - lp.logprob).abs() < 1e-3 * lp.logprob.abs().max(1.0),
                            "{name}: logprob {dl} vs {}",
                            lp.logprob
                        );
                        assert_eq!(got[r].rank, lp.rank, "{name}: rank");
                    }
                }
                // A row alone samples what it samples in the batch.
                let r = rows / 2;
                let one = tensor_of(&cuda, &host[r * vocab..(r + 1) * vocab], 1, vocab);
                let alone = cuda
                    .sample(
                        &one,
                        &[worker::backend::SampleSpec {
                            logits_row: 0,
                            ..specs[r].clone()
                        }],
                    )
                    .unwrap();
                assert_eq!(alone[0].token, got[r].token, "{name}: alone vs batched");
            }
        }
    }
    eprintln!("device sampling: {differ} of {total} rows differ from the host sampler");
    assert!(differ * 50 <= total, "{differ} of {total} rows differ");
}

/// NCCL in a group of one (one GPU here; several ranks need several GPUs):
/// the collectives run through NCCL and the pad/concat kernels and leave the
/// values as they are, and a model runner on such a group gives exactly the
/// runner's results without one.
#[test]
fn nccl_group_of_one() {
    use worker::collective::{HostGroup, TcpGroup};
    if !gpu_present() {
        return;
    }
    let timeout = std::time::Duration::from_secs(30);
    for dtype in [ComputeDtype::Bf16, ComputeDtype::F32] {
        let group = TcpGroup::rendezvous("127.0.0.1:0", 0, 1, timeout).unwrap();
        let b = CudaBackend::with_group(0, dtype, &group).unwrap();
        assert_eq!(b.group_size(), 1);
        let v = Rng(11).vec(5 * 37, 2.0);
        let mut x = tensor_of(&b, &v, 5, 37);
        let before = b.to_host(&x).unwrap();
        b.all_reduce(&mut x).unwrap();
        assert_eq!(b.to_host(&x).unwrap(), before, "{dtype:?} all_reduce");
        let g = b.all_gather_cols(x).unwrap();
        assert_eq!(b.to_host(&g).unwrap(), before, "{dtype:?} all_gather_cols");
    }
    let dir = model_dir("nccl1");
    let cfg = WorkerConfig {
        device: Device::Cuda,
        model: dir.clone(),
        load_format: LoadFormat::Dummy,
        dtype: "bfloat16".into(),
        hf_overrides: serde_json::Value::Null,
        block_size: 16,
        parallel: ParallelConfig::default(),
        seed: 7,
        max_model_len: 2048,
        cpu_int8_activations: false,
        pooling: None,
    };
    let group: std::sync::Arc<dyn HostGroup> =
        std::sync::Arc::new(TcpGroup::rendezvous("127.0.0.1:0", 0, 1, timeout).unwrap());
    let mut with = ModelRunner::load_rank(&cfg, Some(group), None).unwrap();
    let mut without = ModelRunner::load(&cfg).unwrap();
    with.initialize_kv_cache(256).unwrap();
    without.initialize_kv_cache(256).unwrap();
    let got = scenario(&mut with, 16);
    let want = scenario(&mut without, 16);
    let d = compare_outputs(&got, &want, 0.0);
    eprintln!("runner on an NCCL group of one: max logprob diff {d:.2e} (identical expected)");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Structured-output rows on the device: the grammar's bitmask applies
/// before everything else, logprobs included, as the host's `sample_masked`.
#[test]
fn device_sampling_applies_token_bitmasks() {
    use worker::sampler::{draw_uniform, sample_masked, sample_spec, SamplerState};
    if !gpu_present() {
        return;
    }
    let cuda = CudaBackend::new(0, ComputeDtype::Bf16).unwrap();
    let (rows, vocab) = (8, 32_000);
    let mut rng = Rng(5);
    let v = rng.vec(rows * vocab, 4.0);
    let t = tensor_of(&cuda, &v, rows, vocab);
    let host = cuda.to_host(&t).unwrap();
    let modes = [
        SamplingParams {
            logprobs: Some(0),
            ..SamplingParams::greedy()
        },
        SamplingParams {
            temperature: 0.8,
            seed: Some(3),
            logprobs: Some(0),
            ..Default::default()
        },
        SamplingParams {
            temperature: 1.0,
            top_k: 20,
            top_p: 0.9,
            seed: Some(4),
            ..Default::default()
        },
    ];
    for p in &modes {
        let st = SamplerState::new(p, &[1, 2], &[]);
        let mut unused = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
        let masks: Vec<Vec<u32>> = (0..rows)
            .map(|r| {
                // Row r allows about one token in (r + 2), and one row only a few.
                (0..vocab.div_ceil(32))
                    .map(|w| {
                        if r == 0 {
                            (w == 7) as u32 * 0b1010
                        } else {
                            let x = (rng.next() * 1e6) as i64 as u32;
                            x & (x >> 3) & (x >> (r % 5 + 1))
                        }
                    })
                    .collect()
            })
            .collect();
        let specs: Vec<_> = (0..rows)
            .map(|r| {
                let u = if p.is_greedy() {
                    0.0
                } else {
                    draw_uniform(p, &st, &mut unused)
                };
                let mut s = sample_spec(p, &st, vocab, r, u);
                s.bitmask = Some(masks[r].clone());
                s
            })
            .collect();
        let got = cuda.sample(&t, &specs).unwrap();
        for r in 0..rows {
            let mut row = host[r * vocab..(r + 1) * vocab].to_vec();
            let want = sample_masked(&mut row, p, &st, Some(&masks[r]), &mut unused);
            assert_eq!(got[r].token, want.token, "{p:?} row {r}");
            let allowed = masks[r][got[r].token as usize / 32] >> (got[r].token % 32) & 1;
            assert_eq!(allowed, 1, "row {r}: a token the mask forbids");
            if let Some(lp) = want.logprobs {
                let dl = got[r].logit - got[r].log_sum_exp;
                assert!(
                    (dl - lp.logprob).abs() < 1e-3 * lp.logprob.abs().max(1.0),
                    "logprob {dl} vs {}",
                    lp.logprob
                );
                assert_eq!(got[r].rank, lp.rank);
            }
        }
    }
    eprintln!("device sampling with token bitmasks: identical to the host's sample_masked");
}

/// A `--load-format dummy` source, as the model loaders open it.
fn dummy_source(seed: u64) -> Box<dyn WeightSource> {
    let cfg = ModelConfig::from_hf_json(&json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 64,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1,
        "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 64
    }))
    .unwrap();
    worker::loader::open(&std::env::temp_dir(), LoadFormat::Dummy, &cfg, seed).unwrap()
}

/// `m`'s values made on the host: what the device got before dummy
/// weights were made there.
fn eager(m: &HostMatrix) -> HostMatrix {
    assert!(
        matches!(m, HostMatrix::Dummy(_)),
        "the dummy source made values eagerly"
    );
    HostMatrix::Dense(m.to_dense().unwrap())
}

fn assert_same_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{what}: element {i} is {} made on the device, {} made on the host",
            got[i], want[i]
        );
    }
}

/// Dummy weights made on the device (`dummy_fill`) hold exactly the bits
/// of the host's values converted and uploaded (so a GPU dummy model is the
/// CPU one): fused q|k|v of row shards with a bias, gate|up mixing a lazy
/// and a dense part, column shards, a full matrix and an embedding's row
/// shard, at odd widths, in every compute dtype.
#[test]
fn dummy_weights_made_on_device_match_host_values() {
    if !gpu_present() {
        return;
    }
    let mut src = dummy_source(1234);
    let h = 77;
    let mut m = |name: &str, full: (usize, usize), shard: Shard| {
        src.matrix(&format!("{name}.weight"), full, &shard).unwrap()
    };
    let q = m("q_proj", (128, h), Shard::Rows(32..96));
    let k = m("k_proj", (64, h), Shard::Rows(16..48));
    let v = m("v_proj", (64, h), Shard::Rows(16..48));
    let o = m("o_proj", (h, 128), Shard::Cols(32..96));
    let gate = m("gate_proj", (300, h), Shard::Rows(100..250));
    let up = m("up_proj", (300, h), Shard::Rows(100..250));
    let down = m("down_proj", (h, 300), Shard::Cols(100..250));
    let head = m("lm_head", (1000, h), Shard::Full);
    let embed = m("embed_tokens", (1000, h), Shard::Rows(250..500));
    let q_bias = src
        .vector("q_proj.bias", 128, &Shard::Rows(32..96))
        .unwrap();
    let part = |w: HostMatrix, bias: Option<Vec<f32>>| HostLinear { weight: w, bias };
    let linears: Vec<(&str, Vec<HostLinear>)> = vec![
        (
            "qkv",
            vec![part(q, Some(q_bias)), part(k, None), part(v, None)],
        ),
        ("o (column shard)", vec![part(o, None)]),
        (
            "gate|up (lazy and dense parts)",
            vec![part(gate, None), part(eager(&up), None)],
        ),
        ("down (column shard)", vec![part(down, None)]),
        ("lm_head (full)", vec![part(head, None)]),
    ];
    for dtype in [ComputeDtype::F32, ComputeDtype::Bf16, ComputeDtype::F16] {
        let cuda = CudaBackend::new(0, dtype).unwrap();
        for (what, parts) in &linears {
            let host: Vec<HostLinear> = parts
                .iter()
                .map(|p| HostLinear {
                    weight: match &p.weight {
                        w @ HostMatrix::Dummy(_) => eager(w),
                        w => w.clone(),
                    },
                    bias: p.bias.clone(),
                })
                .collect();
            let made = cuda.upload_linear(parts.clone()).unwrap();
            let copied = cuda.upload_linear(host).unwrap();
            let got = cuda.linear_weight_to_host(&made).unwrap();
            let want = cuda.linear_weight_to_host(&copied).unwrap();
            assert!(want.iter().any(|&x| x != 0.0), "{what}: all zeros");
            assert_same_bits(&got, &want, &format!("{what} in {dtype:?}"));
        }
        let made = cuda.upload_embedding(&embed, 250).unwrap();
        let copied = cuda.upload_embedding(&eager(&embed), 250).unwrap();
        assert_same_bits(
            &cuda.embedding_to_host(&made).unwrap(),
            &cuda.embedding_to_host(&copied).unwrap(),
            &format!("embedding row shard in {dtype:?}"),
        );
    }
}

/// A matrix larger than one grid-stride launch covers (65535 * 8 blocks of
/// 256 threads), most of Llama-3.1-8B's embedding (a row shard): made
/// on the device, it still matches the host's values; prints both times.
#[test]
fn large_dummy_matrix_made_on_device_matches_host_values() {
    if !gpu_present() {
        return;
    }
    let mut src = dummy_source(99);
    let (rows, cols) = (128_256, 4096);
    let shard = Shard::Rows(1000..rows);
    let m = src
        .matrix("model.embed_tokens.weight", (rows, cols), &shard)
        .unwrap();
    assert!(m.dims().0 * m.dims().1 > 65_535 * 8 * 256);
    let cuda = CudaBackend::new(0, ComputeDtype::Bf16).unwrap();
    // Once untimed: the first launch loads the module's functions.
    drop(cuda.upload_embedding(&m, 0).unwrap());
    cuda.synchronize().unwrap();
    let t = std::time::Instant::now();
    let made = cuda.upload_embedding(&m, 0).unwrap();
    cuda.synchronize().unwrap();
    let on_device = t.elapsed();
    let t = std::time::Instant::now();
    let host = eager(&m);
    let copied = cuda.upload_embedding(&host, 0).unwrap();
    cuda.synchronize().unwrap();
    let on_host = t.elapsed();
    eprintln!(
        "[{}, {cols}] bf16 dummy matrix: made on the device in {:.1} ms, on the host and copied in {:.1} ms",
        m.dims().0,
        on_device.as_secs_f64() * 1e3,
        on_host.as_secs_f64() * 1e3
    );
    assert_same_bits(
        &cuda.embedding_to_host(&made).unwrap(),
        &cuda.embedding_to_host(&copied).unwrap(),
        "large embedding shard",
    );
}
