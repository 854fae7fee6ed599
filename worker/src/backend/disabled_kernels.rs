//! `VLLM_DISABLED_KERNELS`, for Flotilla's kernels that have an
//! alternative: a disabled one is never picked, and its alternative runs.
//! vLLM's own kernel names mean nothing here, so they are named in a
//! start-up warning rather than ignored silently.

/// The kernels that can be disabled, each with what runs instead.
pub const KERNELS: &[(&str, &str)] = &[
    (PAGED_ATTENTION_LANES, "the tiled paged-attention kernel"),
    (GEMV_ROWS, "cuBLAS"),
    (SAMPLE_ROWS, "sampling on the host"),
];
/// CUDA paged attention with one lane per key (`FLOTILLA_CUDA_ATTENTION=lanes`).
pub const PAGED_ATTENTION_LANES: &str = "paged_attention_lanes";
/// CUDA weight-streaming GEMV for small batches (`FLOTILLA_CUDA_SMALL_BATCH_LINEAR=gemv`).
pub const GEMV_ROWS: &str = "gemv_rows";
/// CUDA sampling on the device.
pub const SAMPLE_ROWS: &str = "sample_rows";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DisabledKernels {
    names: Vec<&'static str>,
}

impl DisabledKernels {
    /// The comma-separated list, and the names that are not Flotilla kernels.
    pub fn parse(value: &str) -> (Self, Vec<String>) {
        let mut names = Vec::new();
        let mut unknown = Vec::new();
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match KERNELS.iter().find(|(k, _)| *k == name) {
                Some((k, _)) => names.push(*k),
                None => unknown.push(name.to_string()),
            }
        }
        (Self { names }, unknown)
    }

    /// From `VLLM_DISABLED_KERNELS`, warning once about names that are not
    /// Flotilla kernels.
    pub fn from_env() -> Self {
        let value = runtime::envs::raw(runtime::envs::VLLM_DISABLED_KERNELS).unwrap_or_default();
        let (disabled, unknown) = Self::parse(&value);
        if !unknown.is_empty() {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                let known: Vec<&str> = KERNELS.iter().map(|(k, _)| *k).collect();
                tracing::warn!(
                    "VLLM_DISABLED_KERNELS: {} are not Flotilla kernels and stay ignored \
                     (Flotilla's kernels that can be disabled: {})",
                    unknown.join(", "),
                    known.join(", ")
                );
            });
        }
        disabled
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(&name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flotilla_names_are_disabled_and_others_reported() {
        let (d, unknown) = DisabledKernels::parse(" gemv_rows, MarlinLinearKernel ,sample_rows,");
        assert!(d.contains(GEMV_ROWS) && d.contains(SAMPLE_ROWS));
        assert!(!d.contains(PAGED_ATTENTION_LANES));
        assert_eq!(unknown, vec!["MarlinLinearKernel".to_string()]);
        assert_eq!(
            DisabledKernels::parse(""),
            (DisabledKernels::default(), vec![])
        );
    }
}
