//! Runs every fuzz entry point under plain `cargo test`: on each committed seed and regression
//! input, and on pseudo-random inputs from a fixed seed.

use std::path::{Path, PathBuf};

use fuzzing::{TARGETS, test_n_times};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

#[test]
fn every_target_has_a_fuzz_binary_and_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    for (name, _) in TARGETS {
        assert!(root.join("fuzz_targets").join(format!("{name}.rs")).is_file(), "no fuzz/fuzz_targets/{name}.rs");
        assert!(!inputs(&root.join("seeds").join(name)).is_empty(), "no seeds in fuzz/seeds/{name}");
    }
}

#[test]
fn seeds_and_regressions_pass() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut ran = 0;
    for (name, target) in TARGETS {
        for dir in [here.join("../../fuzz/seeds").join(name), here.join("regressions").join(name)] {
            for file in inputs(&dir) {
                let data = std::fs::read(&file).unwrap();
                eprintln!("{}", file.display());
                target(&data);
                ran += 1;
            }
        }
    }
    assert!(ran > 0, "no inputs found");
}

#[test]
fn random_inputs_pass() {
    for (i, (_, target)) in TARGETS.iter().enumerate() {
        test_n_times(2_000, 4096, 0x5eed + i as u64, target);
    }
}
