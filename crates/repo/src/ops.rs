//! Repository maintenance: prune (remove the manifests a retention policy does not keep), gc
//! (mark every chunk a restore point or a registered backup needs, sweep the rest once older
//! than a grace period) and copy (to another repository, chunks first and manifests last, so
//! an interrupted copy resumes where it stopped and never shows a restore point it lacks).

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use durable::{LockKind, TEMP_PREFIX, host_name, now_secs, process_alive};

use crate::format::{ChunkId, Index, Manifest, ZERO, chunk_name, encode_chunk};
use crate::full;
use crate::lock::RepoLock;
use crate::prune::{Decision, Retention, select};
use crate::{GC_GENERATION, GC_RESERVE, Registration, Repo, RepoError, Steps, random_hex, reserve_bytes};

/// What a prune did (or would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Every restore point and why it is kept (no reasons: removed).
    pub decisions: Vec<Decision>,
    /// The restore points removed.
    pub removed: Vec<String>,
}

/// What a gc did (or would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Chunks in use.
    pub chunks_in_use: u64,
    /// Chunks removed (or that would be).
    pub chunks_removed: u64,
    /// Unused chunks kept because they are younger than the grace period.
    pub chunks_in_grace: u64,
    /// Index folders of restore points that no longer exist, removed.
    pub indexes_removed: u64,
    /// Registrations of backups that ended without finishing, older than the grace period,
    /// removed.
    pub registrations_removed: u64,
    /// Temporary files (`.tmp-*`) of writers that died, older than the grace period, removed.
    pub temporaries_removed: u64,
    /// Protection markers of restore points that no longer exist (a manifest removed by
    /// hand), older than the grace period, removed.
    pub markers_removed: u64,
    /// Manifests that cannot be read (name: why); while there is one, nothing but temporary
    /// files is removed.
    pub unreadable: Vec<String>,
}

/// The repository's folders, where writers' temporary files may be left.
const TOP_FOLDERS: [&str; 13] = [
    "chunks",
    "indexes",
    "files",
    "points",
    "writers",
    "locks",
    "jobs",
    "pins",
    "resets",
    "sessions",
    "gc",
    "protected",
    "drills",
];

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Restore points copied.
    pub points_copied: Vec<String>,
    /// Restore points the destination already had.
    pub points_present: u64,
    /// Chunks sent.
    pub chunks_copied: u64,
    /// Chunks the destination already had (from an earlier, possibly interrupted, copy).
    pub chunks_present: u64,
    /// Bytes sent (as stored).
    pub bytes_copied: u64,
}

fn young(modified: Option<SystemTime>, grace: Duration) -> bool {
    // A file without a time is treated as young: never remove what is not understood.
    modified.is_none_or(|t| t.elapsed().map_or(true, |age| age < grace))
}

impl Repo {
    /// Removes the restore points `policy` does not keep (their manifests; gc frees their
    /// chunks). With `dry_run`, only says what it would remove.
    pub fn prune(&self, policy: &Retention, dry_run: bool) -> Result<PruneReport, RepoError> {
        if policy.keeps_nothing() {
            return Err(RepoError::Invalid(
                "the retention policy keeps nothing: a prune would remove every restore point".into(),
            ));
        }
        let _lock = self.lock_to_write(LockKind::Shared, "prune")?;
        let mut decisions = select(&self.points()?, policy);
        // A protected point stays, whatever the policy says.
        for d in &mut decisions {
            if self.protection(&d.id)?.is_some() {
                d.reasons.push("protected");
            }
        }
        let mut removed = Vec::new();
        for d in decisions.iter().filter(|d| d.reasons.is_empty()) {
            if !dry_run {
                self.store.delete(&format!("points/{}.json", d.id))?;
            }
            removed.push(d.id.clone());
        }
        Ok(PruneReport { decisions, removed })
    }

    fn index_chunks(&self, name: &str, marked: &mut BTreeSet<ChunkId>) -> Result<(), RepoError> {
        let ix = self.index_file(name, None)?;
        marked.extend(ix.ids.into_iter().filter(|i| *i != ZERO));
        Ok(())
    }

    /// The exclusive lock, on a full disk too: when its file does not fit, gc removes its
    /// reserve ([`GC_RESERVE`]) and tries again. Says whether it removed the reserve.
    fn gc_lock(&self) -> Result<(RepoLock, bool), RepoError> {
        match self.lock_to_write(LockKind::Exclusive, "gc") {
            Err(e) if full(&e) => {
                if !self.store.exists(GC_RESERVE)? {
                    tracing::warn!(
                        "gc cannot write its lock and the repository has no reserve ({GC_RESERVE}, made by init \
                         and by each gc): free some space on {} by hand",
                        self.store.describe()
                    );
                    return Err(e);
                }
                tracing::warn!("gc: {e}; removing the reserve {GC_RESERVE} kept for this, to write its lock");
                self.store.delete(GC_RESERVE)?;
                Ok((self.lock_to_write(LockKind::Exclusive, "gc")?, true))
            }
            other => Ok((other?, false)),
        }
    }

    /// Mark and sweep, under the exclusive lock. Backups keep copying meanwhile (they hold
    /// locks only at their start and end). Marks the chunks of every restore point, and of
    /// every registered backup whose heartbeat is fresh or that is younger than `grace` (its
    /// parent's and its own committed indexes); then, before removing anything, rewrites
    /// `gc/generation`, and removes unmarked chunks older than `grace`. A backup that found a
    /// chunk already stored cannot refresh its time with a create-only write, so it may reuse
    /// one this sweep removes: the changed generation makes it check every chunk it references
    /// before it writes its manifest. An index that cannot be read stops the gc before
    /// anything is removed.
    ///
    /// While any manifest cannot be read, nothing is swept: such a manifest cannot name its
    /// chunks, so a chunk only it references would look like garbage, and removing it would
    /// make that restore point unrecoverable even once its manifest is repaired (from a copy,
    /// say). The report names those manifests. Temporary files that dead writers left
    /// (`.tmp-*`, older than `grace`) are removed in any case: nothing ever references them.
    ///
    /// On a full disk gc first removes its reserve, so that it can write its lock and
    /// generation, and makes it again once it has freed space. Object stores have neither
    /// temporary files nor a reserve.
    pub fn gc(&self, grace: Duration, dry_run: bool) -> Result<GcReport, RepoError> {
        self.gc_with(grace, dry_run, &Steps::default())
    }

    /// [`gc`](Self::gc), telling `steps` how far it has come: marking (one step per disk of a
    /// restore point), then sweeping (one step per chunk folder).
    pub fn gc_with(&self, grace: Duration, dry_run: bool, steps: &Steps) -> Result<GcReport, RepoError> {
        let (_lock, freed_reserve) = self.gc_lock()?;
        let mut report = GcReport::default();
        let (points, unreadable) = self.points_and_unreadable()?;
        report.unreadable = unreadable.into_iter().map(|(name, why)| format!("{name}: {why}")).collect();
        if report.unreadable.is_empty() {
            self.mark_and_sweep(&points, grace, dry_run, &mut report, steps)?;
        }
        if !self.store.file_system() {
            return Ok(report);
        }
        for top in TOP_FOLDERS {
            self.collect_temporaries(top, 2, grace, dry_run, &mut report)?;
        }
        if (freed_reserve || (!dry_run && !self.store.exists(GC_RESERVE)?))
            && let Err(e) = self.store.put(GC_RESERVE, &reserve_bytes())
        {
            tracing::warn!("gc could not make its reserve {GC_RESERVE} again: {e}");
        }
        Ok(report)
    }

    /// Removes the temporary files under `dir`, and its folders `depth` levels down (the
    /// layout is no deeper; a loop of links could be), older than `grace`.
    fn collect_temporaries(
        &self,
        dir: &str,
        depth: u32,
        grace: Duration,
        dry_run: bool,
        report: &mut GcReport,
    ) -> Result<(), RepoError> {
        for e in self.store.list_all(dir)? {
            let name = format!("{dir}/{}", e.name);
            if e.modified.is_none() {
                if depth > 0 {
                    self.collect_temporaries(&name, depth - 1, grace, dry_run, report)?;
                }
            } else if e.name.starts_with(TEMP_PREFIX) && !young(e.modified, grace) {
                if !dry_run {
                    self.store.delete(&name)?;
                }
                report.temporaries_removed += 1;
            }
        }
        Ok(())
    }

    fn mark_and_sweep(
        &self,
        points: &[Manifest],
        grace: Duration,
        dry_run: bool,
        report: &mut GcReport,
        steps: &Steps,
    ) -> Result<(), RepoError> {
        let mut marked = BTreeSet::new();
        let live: BTreeSet<String> = points.iter().map(|m| m.id.clone()).collect();
        steps.phase("marking chunks in use", points.iter().map(|m| m.disks.len() as u64).sum());
        for m in points {
            for d in &m.disks {
                steps.step()?;
                self.index_chunks(&d.index, &mut marked)?;
            }
        }
        let mut registered = BTreeSet::new();
        let now = now_secs();
        let here = host_name();
        for e in self.store.list("writers")? {
            // Folders of saved indexes are read through their registration.
            if e.modified.is_none() || !e.name.ends_with(".json") {
                continue;
            }
            let name = format!("writers/{}", e.name);
            let Some(raw) = self.store.get(&name)? else { continue };
            let reg: Registration = serde_json::from_slice(&raw)
                .map_err(|err| RepoError::Corrupt(format!("{name}: {err} (gc stops rather than guess)")))?;
            // A backup of this host whose process is gone beats no more, whatever its file says.
            let gone = reg.host == here && !process_alive(reg.pid);
            let beating = !gone && now.saturating_sub(reg.heartbeat) <= self.timing.expiry.as_secs();
            if !beating && now.saturating_sub(reg.started) >= grace.as_secs() && !young(e.modified, grace) {
                if !dry_run {
                    self.drop_registration(&reg.id)?;
                }
                report.registrations_removed += 1;
                continue;
            }
            for f in self.store.list(&format!("writers/{}", reg.id))? {
                self.index_chunks(&format!("writers/{}/{}", reg.id, f.name), &mut marked)?;
            }
            for ix in &reg.parent_indexes {
                if self.store.exists(ix)? {
                    self.index_chunks(ix, &mut marked)?;
                }
            }
            for f in self.store.list(&format!("indexes/{}", reg.id))? {
                self.index_chunks(&format!("indexes/{}/{}", reg.id, f.name), &mut marked)?;
            }
            registered.insert(reg.id.clone());
            if let Some(p) = reg.parent {
                registered.insert(p);
            }
        }
        report.chunks_in_use = marked.len() as u64;
        if !dry_run {
            self.store.put(GC_GENERATION, random_hex(16).as_bytes())?;
        }
        let chunk_dirs = self.store.list("chunks")?;
        steps.phase("sweeping chunk folders", chunk_dirs.len() as u64);
        for dir in chunk_dirs {
            steps.step()?;
            for e in self.store.list(&format!("chunks/{}", dir.name))? {
                let name = format!("chunks/{}/{}", dir.name, e.name);
                // Only chunk names are swept: anything else there is not gc's to judge.
                let Some(id) = parse_hex(&e.name) else { continue };
                if marked.contains(&id) {
                    continue;
                }
                if young(e.modified, grace) {
                    report.chunks_in_grace += 1;
                    continue;
                }
                if !dry_run {
                    self.store.delete(&name)?;
                }
                report.chunks_removed += 1;
            }
        }
        // Index, configuration-file and drill-report folders of restore points that are gone.
        for top in ["indexes", "files", "drills"] {
            for dir in self.store.list(top)? {
                if live.contains(&dir.name) || registered.contains(&dir.name) {
                    continue;
                }
                let files = self.store.list(&format!("{top}/{}", dir.name))?;
                if files.iter().any(|f| young(f.modified, grace)) {
                    continue;
                }
                if !dry_run {
                    for f in files {
                        self.store.delete(&format!("{top}/{}/{}", dir.name, f.name))?;
                    }
                }
                if top == "indexes" {
                    report.indexes_removed += 1;
                }
            }
        }
        // Protection markers (`protected/<point>.json`) of points that are gone.
        for e in self.store.list("protected")? {
            let Some(point) = e.name.strip_suffix(".json") else { continue };
            if e.modified.is_none()
                || e.name.starts_with(TEMP_PREFIX)
                || live.contains(point)
                || registered.contains(point)
                || young(e.modified, grace)
            {
                continue;
            }
            if !dry_run {
                self.store.delete(&format!("protected/{}", e.name))?;
            }
            report.markers_removed += 1;
        }
        Ok(())
    }

    /// Copies restore points (all, or those named) to `dest`, which must use the same chunk
    /// size. Each chunk is checked against its name before it is sent, and sent only if
    /// `dest` lacks it; a restore point's indexes follow its chunks and its manifest comes
    /// last. Run again after an interruption, it sends only what is missing. When the two
    /// repositories' keys differ (or one is encrypted and the other not), chunks are
    /// re-encoded under the destination's key and names, and indexes rewritten to match.
    pub fn copy_to(&self, dest: &Repo, only: Option<&[String]>) -> Result<CopyReport, RepoError> {
        self.copy_to_with(dest, only, &Steps::default())
    }

    /// [`copy_to`](Self::copy_to), telling `steps` how far it has come: one step per chunk
    /// reference of the restore points to copy.
    pub fn copy_to_with(&self, dest: &Repo, only: Option<&[String]>, steps: &Steps) -> Result<CopyReport, RepoError> {
        if dest.config.chunk_size != self.config.chunk_size {
            return Err(RepoError::Invalid(format!(
                "{} uses chunks of {} bytes and {} of {}: a copy needs the same chunk size",
                self.store.describe(),
                self.config.chunk_size,
                dest.store.describe(),
                dest.config.chunk_size
            )));
        }
        let _src = self.lock(LockKind::Shared, "copy (source)")?;
        let _dst = dest.lock_to_write(LockKind::Shared, "copy (destination)")?;
        let mut report = CopyReport::default();
        let have: BTreeSet<String> = dest.points()?.into_iter().map(|m| m.id).collect();
        let mut sent = BTreeSet::new();
        let mut todo = Vec::new();
        for m in self.points()? {
            if only.is_some_and(|o| !o.contains(&m.id)) {
                continue;
            }
            if have.contains(&m.id) {
                report.points_present += 1;
                continue;
            }
            todo.push(m);
        }
        let count = todo.len();
        for (k, m) in todo.into_iter().enumerate() {
            let phase = format!("copying restore point {} of {count} ({} of {})", k + 1, m.id, m.source.name);
            self.copy_point(dest, &m, &mut sent, &mut report, (steps, &phase))?;
            report.points_copied.push(m.id.clone());
        }
        Ok(report)
    }

    /// The restore points a copy should send to `dest` when `dest` keeps `policy` (a
    /// long-term tier with its own retention): those it lacks that the policy would keep
    /// among its points and these together. Copying them all instead would send again, on
    /// every run, each point the destination's own prune removed.
    pub fn points_to_copy(&self, dest: &Repo, policy: &Retention) -> Result<Vec<String>, RepoError> {
        let mut all = dest.points()?;
        let have: BTreeSet<String> = all.iter().map(|m| m.id.clone()).collect();
        let new: Vec<Manifest> = self.points()?.into_iter().filter(|m| !have.contains(&m.id)).collect();
        all.extend(new.iter().cloned());
        let kept: BTreeSet<String> =
            select(&all, policy).into_iter().filter(|d| !d.reasons.is_empty()).map(|d| d.id).collect();
        Ok(new.into_iter().filter(|m| kept.contains(&m.id)).map(|m| m.id).collect())
    }

    fn copy_point(
        &self,
        dest: &Repo,
        m: &Manifest,
        sent: &mut BTreeSet<ChunkId>,
        report: &mut CopyReport,
        (steps, phase): (&Steps, &str),
    ) -> Result<(), RepoError> {
        // The same key (or none on both sides): files go across as they are.
        let same = self.codec.key_check() == dest.codec.key_check();
        let max = u64::from(self.config.chunk_size);
        let mut out = m.clone();
        let indexes = (0..m.disks.len()).map(|n| self.index(m, n)).collect::<Result<Vec<_>, _>>()?;
        steps.phase(phase, indexes.iter().map(|ix| ix.ids.len() as u64).sum());
        for ((n, d), ix) in m.disks.iter().enumerate().zip(indexes) {
            let mut new_ix =
                Index { chunk_size: ix.chunk_size, capacity: ix.capacity, ids: Vec::with_capacity(ix.ids.len()) };
            for id in &ix.ids {
                steps.step()?;
                if *id == ZERO {
                    new_ix.ids.push(ZERO);
                    continue;
                }
                let name = chunk_name(id);
                // Never spread damage: the chunk must be the one its name says.
                let fetch = || -> Result<(Vec<u8>, Vec<u8>), RepoError> {
                    let raw = self.store.get(&name)?.ok_or_else(|| RepoError::Corrupt(format!("{name} is missing")))?;
                    let plain =
                        crate::format::decode_chunk_with(&self.codec.open(&name, raw.clone())?, id, max, &|p| {
                            self.codec.hash(p)
                        })?;
                    Ok((raw, plain))
                };
                let (new_id, bytes) = if same {
                    (*id, None)
                } else {
                    let (_, plain) = fetch()?;
                    (dest.codec.hash(&plain), Some(plain))
                };
                new_ix.ids.push(new_id);
                if !sent.insert(new_id) {
                    continue;
                }
                let new_name = chunk_name(&new_id);
                if dest.store.exists(&new_name)? {
                    report.chunks_present += 1;
                    continue;
                }
                let data = match bytes {
                    Some(plain) => dest.codec.seal(&new_name, encode_chunk(&plain))?,
                    None => fetch()?.0,
                };
                if dest.store.put_new(&new_name, &data)? {
                    report.chunks_copied += 1;
                    report.bytes_copied += data.len() as u64;
                } else {
                    report.chunks_present += 1;
                }
            }
            let stored = if same {
                self.store.get(&d.index)?.ok_or_else(|| RepoError::Corrupt(format!("{} is missing", d.index)))?
            } else {
                dest.codec.seal(&d.index, new_ix.encode())?
            };
            out.disks[n].index_blake3 = blake3::hash(&stored).to_hex().to_string();
            dest.store.put(&d.index, &stored)?;
        }
        for (n, f) in m.files.iter().enumerate() {
            let stored = if same {
                self.store.get(&f.stored)?.ok_or_else(|| RepoError::Corrupt(format!("{} is missing", f.stored)))?
            } else {
                dest.codec.seal(&f.stored, self.file(m, &f.name)?)?
            };
            out.files[n].stored_blake3 = blake3::hash(&stored).to_hex().to_string();
            dest.store.put(&f.stored, &stored)?;
        }
        dest.put_manifest(&out)
    }
}

fn parse_hex(s: &str) -> Option<ChunkId> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}
