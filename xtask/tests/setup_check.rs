//! `cargo xtask setup --check` names a missing peer and exits non-zero, and says present for one
//! that is there: run on the real binary, with the peers' places pointed at a scratch folder.

use std::process::Command;

fn check(env: &[(&str, &std::path::Path)]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.args(["setup", "--check"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running xtask");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn line<'a>(stdout: &'a str, peer: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(peer))
        .unwrap_or_else(|| panic!("no line for {peer} in:\n{stdout}"))
}

#[test]
fn a_missing_peer_is_named_and_the_exit_code_says_so() {
    let dir = tempfile::tempdir().unwrap();
    // An empty cache: vcsim, pyvmomi and SeaweedFS are not there, whatever else the machine has.
    let (code, stdout, stderr) = check(&[
        ("XDG_CACHE_HOME", dir.path()),
        ("SYNCPROXY_VCSIM", &dir.path().join("no-vcsim")),
        ("SYNCPROXY_PYTHONPATH", &dir.path().join("no-py")),
        ("SYNCPROXY_WEED", &dir.path().join("no-weed")),
    ]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    for peer in ["vcsim", "pyvmomi", "SeaweedFS"] {
        assert!(line(&stdout, peer).starts_with("MISSING"), "{stdout}");
        assert!(stderr.contains(peer), "the summary names {peer}: {stderr}");
    }
}

#[test]
fn a_peer_that_is_there_is_present() {
    let dir = tempfile::tempdir().unwrap();
    let vcsim = dir.path().join("vcsim");
    std::fs::write(&vcsim, b"").unwrap();
    let (_, stdout, _) = check(&[("SYNCPROXY_VCSIM", &vcsim), ("SYNCPROXY_WEED", &vcsim)]);
    assert!(line(&stdout, "vcsim").starts_with("present"), "{stdout}");
    assert!(line(&stdout, "SeaweedFS").starts_with("present"), "{stdout}");
}
