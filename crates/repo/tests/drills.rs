//! Drill reports kept beside their restore point: stored, listed, read back, refused when
//! they name nothing, skipped when damaged, and swept by gc with their point.

mod common;

use std::time::Duration;

use repo::{Repo, RepoError, Retention};

async fn repo_with_points(dir: &std::path::Path, n: u8) -> (Repo, Vec<String>) {
    let repo = Repo::init(dir.join("r"), 1 << 16).unwrap();
    let mut ids = Vec::new();
    for i in 0..n {
        let m = common::backup_bytes(&repo, None, &vec![i + 1; 1 << 16]).await.unwrap();
        ids.push(m.id);
    }
    (repo, ids)
}

#[tokio::test]
async fn a_report_is_kept_listed_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, ids) = repo_with_points(dir.path(), 1).await;
    let id = &ids[0];
    assert!(repo.drill_reports(id).unwrap().is_empty());
    let rec = repo
        .add_drill_report(id, true, "every check passed", Some(6.5), br#"{"passed":true}"#, b"<html></html>")
        .unwrap();
    assert!(rec.passed);
    assert_eq!(repo.drill_reports(id).unwrap(), vec![rec.clone()]);
    assert_eq!(repo.drill_file(&rec.stored_html).unwrap(), b"<html></html>");
    assert_eq!(repo.drill_report_json(&rec).unwrap(), serde_json::json!({"passed": true}));
    let second = repo.add_drill_report(id, false, "no marker", None, b"{}", b"").unwrap();
    assert_eq!(repo.drill_reports(id).unwrap(), vec![rec, second], "oldest first");
}

#[tokio::test]
async fn reports_of_a_missing_point_or_not_json_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, ids) = repo_with_points(dir.path(), 1).await;
    let id = &ids[0];
    assert!(matches!(repo.add_drill_report("nope", true, "", None, b"{}", b""), Err(RepoError::NotFound(_))));
    assert!(matches!(repo.add_drill_report(id, true, "", None, b"not json", b""), Err(RepoError::Invalid(_))));
    assert!(matches!(repo.drill_file("points/x.json"), Err(RepoError::Invalid(_))));
    assert!(matches!(repo.drill_file("drills/../points/x.json"), Err(RepoError::Invalid(_))));
    assert!(repo.drill_reports(id).unwrap().is_empty());
}

#[tokio::test]
async fn a_damaged_record_is_skipped_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, ids) = repo_with_points(dir.path(), 1).await;
    let rec = repo.add_drill_report(&ids[0], false, "no marker", None, b"{}", b"").unwrap();
    repo.store().put(&rec.stored, b"garbage").unwrap();
    assert!(repo.drill_reports(&ids[0]).unwrap().is_empty());
}

#[tokio::test]
async fn gc_removes_the_reports_of_a_pruned_point_and_keeps_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, ids) = repo_with_points(dir.path(), 2).await;
    let old = repo.add_drill_report(&ids[0], true, "ok", None, b"{}", b"old").unwrap();
    let new = repo.add_drill_report(&ids[1], true, "ok", None, b"{}", b"new").unwrap();
    repo.prune(&Retention { last: 1, ..Default::default() }, false).unwrap();
    repo.gc(Duration::ZERO, false).unwrap();
    assert!(repo.store().get(&old.stored).unwrap().is_none(), "the pruned point's report is swept");
    assert!(repo.store().get(&old.stored_html).unwrap().is_none());
    assert_eq!(repo.drill_reports(&ids[1]).unwrap(), vec![new]);
}
