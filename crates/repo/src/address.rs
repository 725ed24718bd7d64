//! How an operator names a restore point: its ID, a unique prefix of it, `VM@latest`,
//! `VM@DATE` (the VM's newest point of that UTC day, or of any time that starts so), or a
//! bare `latest`, which is refused in a repository holding several VMs rather than silently
//! picking another VM's point.

use crate::{Manifest, Repo, RepoError};

/// The shortest ID prefix taken (shorter ones match too much to be meant).
const MIN_PREFIX: usize = 4;

/// The restore point `spec` names among `points` (oldest first).
pub fn resolve<'a>(points: &'a [Manifest], spec: &str) -> Result<&'a Manifest, RepoError> {
    let spec = spec.trim();
    if points.is_empty() {
        return Err(RepoError::NotFound("the repository has no restore points".into()));
    }
    let vms = || {
        let mut names: Vec<&str> = points.iter().map(|p| p.source.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names
    };
    if spec == "latest" {
        let names = vms();
        if names.len() > 1 {
            return Err(RepoError::Invalid(format!(
                "`latest` is ambiguous: the repository holds restore points of {} sources; name one as {}",
                names.len(),
                names.iter().take(8).map(|n| format!("{n}@latest")).collect::<Vec<_>>().join(", ")
            )));
        }
        return points.last().ok_or_else(|| RepoError::NotFound("no restore points".into()));
    }
    if let Some((vm, when)) = spec.rsplit_once('@') {
        let of_vm: Vec<&Manifest> = points.iter().filter(|p| p.source.name == vm).collect();
        if of_vm.is_empty() {
            return Err(RepoError::NotFound(format!(
                "no restore point of {vm:?}; the repository has points of {}",
                vms().iter().take(8).map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
            )));
        }
        let found = if when == "latest" {
            of_vm.last().copied()
        } else if when.is_empty() {
            None
        } else {
            of_vm.iter().rev().find(|p| p.time.starts_with(when)).copied()
        };
        return found.ok_or_else(|| {
            RepoError::NotFound(format!(
                "no restore point of {vm:?} at {when:?} (use `latest`, or a UTC date or time such as 2026-12-01 \
                 or 2026-12-01T02); its points are from {} to {}",
                of_vm.first().map_or("", |p| p.time.as_str()),
                of_vm.last().map_or("", |p| p.time.as_str())
            ))
        });
    }
    if let Some(p) = points.iter().find(|p| p.id == spec) {
        return Ok(p);
    }
    let matches: Vec<&Manifest> = points.iter().filter(|p| p.id.starts_with(spec)).collect();
    match matches.as_slice() {
        [one] if spec.len() >= MIN_PREFIX => Ok(one),
        [] => Err(RepoError::NotFound(format!("no restore point {spec}"))),
        _ if spec.len() < MIN_PREFIX => Err(RepoError::Invalid(format!(
            "{spec:?} is too short to name a restore point: give at least {MIN_PREFIX} characters of its ID"
        ))),
        many => Err(RepoError::Invalid(format!(
            "{spec:?} names {} restore points ({}{}); give more of the ID",
            many.len(),
            many.iter().take(5).map(|p| p.id.as_str()).collect::<Vec<_>>().join(", "),
            if many.len() > 5 { ", ..." } else { "" }
        ))),
    }
}

impl Repo {
    /// The restore point `spec` names (see [`resolve`]).
    pub fn resolve_point(&self, spec: &str) -> Result<Manifest, RepoError> {
        // An exact ID (letters, digits and dashes only) needs no listing.
        if !spec.is_empty()
            && spec.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && let Ok(m) = self.point(spec)
        {
            return Ok(m);
        }
        resolve(&self.points()?, spec).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Consistency, FORMAT, SourceInfo};

    fn point(id: &str, time: &str, vm: &str) -> Manifest {
        Manifest {
            format: FORMAT,
            id: id.into(),
            time: time.into(),
            parent: None,
            source: SourceInfo { name: vm.into(), instance_uuid: None },
            consistency: Consistency::Crash,
            disks: vec![],
            files: vec![],
        }
    }

    fn points() -> Vec<Manifest> {
        vec![
            point("20261201T0100-aaaa", "2026-12-01T01:00:00Z", "db01"),
            point("20261201T0200-bbbb", "2026-12-01T02:00:00Z", "web"),
            point("20261201T2300-cccc", "2026-12-01T23:00:00Z", "db01"),
            point("20261202T0100-dddd", "2026-12-02T01:00:00Z", "db01"),
        ]
    }

    #[test]
    fn names_resolve_to_the_point_meant() {
        let p = points();
        let id = |s: &str| resolve(&p, s).map(|m| m.id.clone());
        assert_eq!(id("db01@latest").unwrap(), "20261202T0100-dddd");
        assert_eq!(id("web@latest").unwrap(), "20261201T0200-bbbb");
        assert_eq!(id("db01@2026-12-01").unwrap(), "20261201T2300-cccc", "the newest of that day");
        assert_eq!(id("db01@2026-12-01T01").unwrap(), "20261201T0100-aaaa");
        assert_eq!(id("20261201T0200-bbbb").unwrap(), "20261201T0200-bbbb");
        assert_eq!(id("20261202").unwrap(), "20261202T0100-dddd", "a unique prefix");
    }

    #[test]
    fn ambiguous_or_unknown_names_are_refused_with_the_choices() {
        let p = points();
        let err = |s: &str| resolve(&p, s).unwrap_err().to_string();
        let e = err("latest");
        assert!(e.contains("db01@latest") && e.contains("web@latest"), "{e}");
        assert!(err("2026120").contains("names 4 restore points"), "{}", err("2026120"));
        assert!(err("202").contains("too short"));
        assert!(err("mail@latest").contains("\"db01\""));
        assert!(err("db01@2025").contains("from 2026-12-01T01:00:00Z"));
        assert!(err("db01@").contains("no restore point of"));
        assert!(matches!(resolve(&p, "nope"), Err(RepoError::NotFound(_))));
        assert!(matches!(resolve(&[], "latest"), Err(RepoError::NotFound(_))));
    }

    #[test]
    fn a_bare_latest_is_fine_with_one_source() {
        let p: Vec<Manifest> = points().into_iter().filter(|m| m.source.name == "db01").collect();
        assert_eq!(resolve(&p, "latest").unwrap().id, "20261202T0100-dddd");
    }
}
