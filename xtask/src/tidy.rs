//! Repository rules that no compiler checks: module docs, no stubs or ignored tests, `unsafe`
//! only in the VDDK crates, `anyhow` only in binaries, only orchestration's `job` importing its
//! `flow`, every crate in the codemap, and no path that leaves the repository in any text file
//! it holds (a clone must need nothing beside it).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// Directories holding our Rust code.
const CODE_DIRS: &[&str] = &["crates", "bins", "xtask", "benches", "fuzz"];

pub(crate) fn check(root: &Path) -> Result<()> {
    let problems = problems(root)?;
    if problems.is_empty() {
        return Ok(());
    }
    bail!("tidy found {} problem(s):\n  {}", problems.len(), problems.join("\n  "))
}

fn problems(root: &Path) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    // Spelled in pieces so that this file does not trip over itself.
    let banned = [
        (concat!("todo", "!("), "a stub (todo!) is not done"),
        (concat!("unimplemented", "!("), "a stub (unimplemented!) is not done"),
        (concat!("#[", "ignore"), "an ignored test; gate slow tests by an environment variable instead"),
        (concat!("#[", "should_panic"), "a should_panic test; assert on the error instead"),
    ];
    let unsafe_marks = [
        concat!("unsafe", " {"),
        concat!("unsafe", " fn"),
        concat!("unsafe", " impl"),
        concat!("allow(", "unsafe_code"),
    ];
    for file in rust_files(root)? {
        let rel = file.strip_prefix(root).unwrap_or(&file).display().to_string();
        let text = std::fs::read_to_string(&file)?;
        if !text.starts_with("//!") {
            problems.push(format!("{rel}: must open with a `//!` line saying what the file is for"));
        }
        for (needle, why) in banned {
            if text.contains(needle) {
                problems.push(format!("{rel}: {why}"));
            }
        }
        // The per-VM flow is the top of orchestration: only the job runs it. A lower module
        // (drs, cbt_reset, the targets, the copy) that imported it would make a circle again.
        let orchestration = rel.starts_with("crates/orchestration/src/");
        if orchestration && !rel.starts_with("crates/orchestration/src/job") && text.contains("crate::flow") {
            problems.push(format!(
                "{rel}: only `job` imports `flow` (the order of a VM's steps); move what is shared lower"
            ));
        }
        let in_vddk = rel.starts_with("crates/vddk");
        if !in_vddk && unsafe_marks.iter().any(|m| text.contains(m)) {
            problems.push(format!("{rel}: `unsafe` belongs only in the VDDK crates (crates/vddk*)"));
        }
    }
    for manifest in manifests(root)? {
        let rel = manifest.strip_prefix(root).unwrap_or(&manifest).display().to_string();
        let text = std::fs::read_to_string(&manifest)?;
        let library = rel.starts_with("crates/");
        if library && text.lines().any(|l| l.trim_start().starts_with("anyhow")) {
            problems
                .push(format!("{rel}: library crates own typed errors (thiserror); anyhow is for bins/ and xtask/"));
        }
    }
    for file in text_files(root)? {
        let rel = file.strip_prefix(root).unwrap_or(&file).display().to_string();
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        for (n, line) in text.lines().enumerate() {
            if let Some(path) = outside_path(line) {
                problems.push(format!("{rel}:{}: `{path}` is outside the repository; a clone does not have it", n + 1));
            }
        }
    }
    let architecture = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap_or_default();
    for dir in ["crates", "bins"] {
        for name in subdirs(&root.join(dir))? {
            if !architecture.contains(&format!("`{dir}/{name}`")) {
                problems.push(format!("ARCHITECTURE.md: the codemap does not describe `{dir}/{name}`"));
            }
        }
    }
    Ok(problems)
}

/// A path in `line` that leaves the repository for the `shared` folder beside it, or for the
/// machine it was written on (its work folder at the root), if any.
/// Spelled in pieces so that this file does not trip over itself.
fn outside_path(line: &str) -> Option<&str> {
    let at = [concat!("..", "/shared"), concat!("/wo", "rk/")]
        .iter()
        .filter_map(|needle| line.find(needle))
        .filter(|&at| !line[..at].ends_with(|c: char| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')))
        .min()?;
    let rest = &line[at..];
    let end = rest.find(|c: char| c.is_whitespace() || matches!(c, '`' | '"' | '\'' | ')')).unwrap_or(rest.len());
    Some(&rest[..end])
}

fn subdirs(dir: &Path) -> Result<Vec<String>> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(Vec::new()) };
    let mut names = Vec::new();
    for e in entries {
        let e = e?;
        if e.file_type()?.is_dir() {
            names.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

fn rust_files(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for dir in CODE_DIRS {
        walk(&root.join(dir), &mut |p| p.extension().is_some_and(|e| e == "rs"), &mut out)?;
    }
    Ok(out)
}

/// Every file a clone holds that a person or a program reads as text: code, manifests, docs,
/// scripts (`.ci/`), the peers' sources (`tests/`).
fn text_files(root: &Path) -> Result<Vec<PathBuf>> {
    const TEXT: &[&str] = &["rs", "toml", "md", "go", "py", "sh", "service", "h", "txt", "json", "yml", "yaml"];
    let mut out = Vec::new();
    let text = |p: &Path| p.extension().is_some_and(|e| TEXT.iter().any(|t| e == *t));
    for dir in CODE_DIRS.iter().chain(&["tests"]) {
        walk(&root.join(dir), &mut |p| text(p), &mut out)?;
    }
    walk(&root.join(".ci"), &mut |_| true, &mut out)?;
    let top = std::fs::read_dir(root)?;
    for e in top {
        let path = e?.path();
        if path.is_file() && text(&path) {
            out.push(path);
        }
    }
    Ok(out)
}

fn manifests(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for dir in CODE_DIRS {
        walk(&root.join(dir), &mut |p| p.file_name().is_some_and(|n| n == "Cargo.toml"), &mut out)?;
    }
    Ok(out)
}

fn walk(dir: &Path, keep: &mut impl FnMut(&Path) -> bool, out: &mut Vec<PathBuf>) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for e in entries {
        let path = e?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if path.is_dir() {
            // Build output, fuzzer-grown corpora and artifacts are not our code.
            if !matches!(name.as_str(), "target" | "corpus" | "artifacts" | "coverage") {
                walk(&path, keep, out)?;
            }
        } else if keep(&path) {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_is_tidy() {
        let root = crate::project_root();
        let problems = problems(&root).unwrap();
        assert!(problems.is_empty(), "tidy:\n  {}", problems.join("\n  "));
    }

    #[test]
    fn only_paths_beside_the_repository_are_outside_it() {
        let beside = concat!("bash ..", "/shared/peers/vcsim/setup.sh");
        assert_eq!(outside_path(beside), Some(concat!("..", "/shared/peers/vcsim/setup.sh")));
        let machine = concat!("see `/wo", "rk/shared/reference/notes.md`");
        assert_eq!(outside_path(machine), Some(concat!("/wo", "rk/shared/reference/notes.md")));
        for fine in [
            "let a: Arc<Mutex<u8>> = x;",
            "a shared disk",
            "include_str!(\"../tests/a.xml\")",
            "--shared=8",
            concat!("src/net", "work/mod.rs"),
            concat!("a frame", "work/ folder"),
        ] {
            assert_eq!(outside_path(fine), None, "{fine}");
        }
    }

    #[test]
    fn tidy_catches_what_it_claims_to() {
        let dir = std::env::temp_dir().join(format!("xtask-tidy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("crates/foo/src")).unwrap();
        std::fs::write(
            dir.join("crates/foo/src/lib.rs"),
            concat!("fn f() { ", "todo", "!() }\n#[", "ignore]\nfn g() { ", "unsafe", " {} }\n"),
        )
        .unwrap();
        std::fs::write(dir.join("crates/foo/Cargo.toml"), "[dependencies]\nanyhow = \"1\"\n").unwrap();
        std::fs::create_dir_all(dir.join("crates/orchestration/src")).unwrap();
        std::fs::write(dir.join("crates/orchestration/src/drs.rs"), "//! DRS.\nuse crate::flow::blocking;\n").unwrap();
        std::fs::create_dir_all(dir.join(".ci")).unwrap();
        std::fs::write(dir.join(".ci/run"), concat!("bash ..", "/shared/setup.sh\n")).unwrap();
        std::fs::create_dir_all(dir.join("tests/peers")).unwrap();
        std::fs::write(dir.join("tests/peers/main.go"), concat!("// from /wo", "rk/shared/x.go\n")).unwrap();
        let found = problems(&dir).unwrap().join("\n");
        std::fs::remove_dir_all(&dir).unwrap();
        for expected in [
            "`//!`",
            "todo!",
            "ignored test",
            "`unsafe`",
            "anyhow",
            "`crates/foo`",
            ".ci/run:1",
            "main.go:1",
            "drs.rs: only `job`",
        ] {
            assert!(found.contains(expected), "tidy missed {expected}:\n{found}");
        }
    }
}
