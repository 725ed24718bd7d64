//! Fuzz-input generators and oracles for the workspace's parsers and planners.
//!
//! The targets in `fuzz/` are one-line wrappers around the functions here, so that everything
//! they check also runs under plain `cargo test`: on pseudo-random inputs ([`test_n_times`]) and
//! on every committed seed and regression input (`tests/corpora.rs`).

pub mod cbt;
pub mod config;
pub mod drill;
pub mod nbd;
pub mod pipeline;
pub mod repo;
pub mod vmdk;
pub mod vsphere;

/// A fuzz entry point: takes the fuzzer's bytes, panics on a broken promise.
pub type FuzzTarget = fn(&[u8]);

/// Every fuzz target: its name under `fuzz/fuzz_targets/` and its entry point.
pub const TARGETS: &[(&str, FuzzTarget)] = &[
    ("cbt_change_id", cbt::change_id),
    ("cbt_plan", cbt::plan_and_accumulate),
    ("cbt_areas", cbt::areas),
    ("vmdk_descriptor", vmdk::descriptor),
    ("vmdk_sparse", vmdk::sparse),
    ("vmdk_stream", vmdk::stream),
    ("vmdk_cowd", vmdk::cowd),
    ("vmdk_sesparse", vmdk::sesparse),
    ("nbd_reply", nbd::reply),
    ("nbd_server", nbd::server),
    ("nbd_uri", pipeline::nbd_uri),
    ("state_files", pipeline::state_files),
    ("soap_response", vsphere::soap_response),
    ("repo_files", repo::repo_files),
    ("serve_config", config::serve_config),
    ("vmx", drill::vmx),
];

/// Runs `f` on `iterations` pseudo-random inputs of up to `max_len` bytes, from a fixed seed so
/// that a failure reproduces.
pub fn test_n_times(iterations: u32, max_len: usize, seed: u64, f: impl Fn(&[u8])) {
    let mut state = seed | 1;
    let mut next = move || {
        // xorshift64*: small, fast and good enough to spread bytes.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut buf = Vec::with_capacity(max_len);
    for _ in 0..iterations {
        let len = usize::try_from(next() % (max_len as u64 + 1)).unwrap_or(max_len);
        buf.clear();
        buf.extend((0..len).map(|_| next().to_le_bytes()[7]));
        f(&buf);
    }
}
