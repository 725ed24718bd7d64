//! The binding against the fake `libvixDiskLib.so.8`, loaded through the real dlopen path:
//! reads, allocation maps, metadata, async reads, injected failures, several disks at once.
#![expect(clippy::cast_possible_truncation, reason = "test sizes are small")]

mod common;

use std::sync::OnceLock;
use std::time::Instant;

use common::{block_on, image};
use vddk::{ConnectParams, Credentials, ErrorClass, Library, OpenFlags, Vddk, VddkError};
use vddk_fake::{Fake, libdir};

const MIB: u64 = 1 << 20;

/// VDDK initialises once per process, so the tests share one.
fn vddk() -> &'static Vddk {
    static VDDK: OnceLock<Vddk> = OnceLock::new();
    VDDK.get_or_init(|| Library::load(&libdir(Fake::V8)).unwrap().init(None).unwrap())
}

fn local(vm: &str) -> ConnectParams {
    ConnectParams { vm_moref: Some(vm.to_owned()), read_only: true, ..ConnectParams::default() }
}

fn read_all(disk: &vddk::Disk, chunk: u64) -> Vec<u8> {
    let capacity = disk.info().capacity();
    let mut out = Vec::with_capacity(capacity as usize);
    let mut at = 0;
    while at < capacity {
        let n = chunk.min(capacity - at);
        out.extend(disk.read(at / 512, vec![0; n as usize]).unwrap());
        at += n;
    }
    out
}

#[test]
fn a_full_read_equals_the_file_and_info_is_right() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let contents = image(&path, 8 * MIB, &[(0, 4096), (MIB + 512, 300_000), (7 * MIB, MIB)]);
    let conn = vddk().connect(&local("vm-1")).unwrap();
    let disk = conn.open(path.to_str().unwrap(), OpenFlags { read_only: true, ..OpenFlags::default() }).unwrap();
    assert_eq!(disk.info().capacity(), 8 * MIB);
    assert_eq!(disk.info().sector_sizes, Some((512, 4096)));
    assert!(disk.info().uuid.is_some());
    assert_eq!(disk.transport(), "file");
    assert!(read_all(&disk, 2 * MIB) == contents, "sync read differs");
    // ReadAsync + Wait, several in flight.
    let requests: Vec<(u64, Vec<u8>)> = (0..8).map(|i| (i * 2048, vec![0u8; MIB as usize])).collect();
    let got: Vec<u8> = disk.read_async(requests).unwrap().concat();
    assert!(got == contents, "async read differs");
    // The async facade.
    let fut = disk.read_request(MIB / 512 + 1, vec![0; 4096]).unwrap();
    assert_eq!(block_on(fut).unwrap().unwrap(), contents[(MIB + 512) as usize..(MIB + 4608) as usize]);
}

#[test]
fn allocated_blocks_equal_the_files_data_extents() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.raw");
    image(&path, 64 * MIB, &[(MIB, 4096), (5 * MIB, MIB), (63 * MIB, MIB)]);
    let conn = vddk().connect(&local("vm-2")).unwrap();
    let disk = conn.open(path.to_str().unwrap(), OpenFlags { read_only: true, ..OpenFlags::default() }).unwrap();
    let blocks = disk.allocated_blocks(0, 64 * MIB / 512, 128).unwrap().expect("VDDK 8 has QueryAllocatedBlocks");
    // At 64 KiB (128-sector) granularity.
    assert_eq!(blocks, [(2048, 128), (10240, 2048), (129_024, 2048)]);
    // A range in the middle, not chunk-aligned: clipped to what was asked.
    let part = disk.allocated_blocks(10300, 100, 128).unwrap().unwrap();
    assert_eq!(part, [(10300, 100)]);
}

#[test]
fn metadata_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.raw");
    image(&path, MIB, &[]);
    let conn = vddk().connect(&local("vm-3")).unwrap();
    let disk = conn.open(path.to_str().unwrap(), OpenFlags::default()).unwrap();
    let keys = disk.metadata_keys().unwrap();
    assert!(keys.contains(&"adapterType".to_owned()) && keys.contains(&"uuid".to_owned()), "{keys:?}");
    assert_eq!(disk.read_metadata("adapterType").unwrap().as_deref(), Some("lsilogic"));
    assert_eq!(disk.read_metadata("nope").unwrap(), None);
    match disk.read(MIB / 512, vec![0; 512]) {
        Err(VddkError::Call { op: "Read", code: 16007, class: ErrorClass::OutOfRange, .. }) => {}
        other => panic!("expected an out-of-range error, got {other:?}"),
    }
    assert!(matches!(disk.read(0, vec![0; 100]), Err(VddkError::Invalid(_))));
    // Writes at sector offsets (the disk is open read-write here), read back, then flushed.
    let pattern: Vec<u8> = (0..1024u32).map(|i| i.to_le_bytes()[0]).collect();
    let returned = disk.write(100, pattern.clone()).unwrap();
    assert_eq!(returned.len(), 1024, "the buffer comes back for reuse");
    assert_eq!(disk.read(100, vec![0; 1024]).unwrap(), pattern);
    assert!(matches!(disk.write(MIB / 512, vec![0; 512]), Err(VddkError::Call { code: 16007, .. })));
    disk.flush().unwrap();
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[100 * 512..100 * 512 + 1024], &pattern[..]);
    // Writes and a flush queued as futures, before any is awaited: the worker runs them in
    // order, so the second write to sector 300 wins and the flush follows both.
    let first = disk.write_request(300, vec![1; 1024]).unwrap();
    let second = disk.write_request(300, vec![2; 512]).unwrap();
    let flushed = disk.flush_request().unwrap();
    assert!(matches!(disk.write_request(0, vec![0; 100]), Err(VddkError::Invalid(_))));
    block_on(flushed).unwrap().unwrap();
    assert_eq!(block_on(second).unwrap().unwrap(), vec![2; 512]);
    assert_eq!(block_on(first).unwrap().unwrap().len(), 1024);
    let on_disk = std::fs::read(&path).unwrap();
    assert!(on_disk[300 * 512..301 * 512].iter().all(|&b| b == 2), "the later write wins");
    assert!(on_disk[301 * 512..302 * 512].iter().all(|&b| b == 1));
    let missing = conn.open("/nonexistent/disk.vmdk", OpenFlags::default()).unwrap_err();
    assert!(missing.to_string().contains("VixDiskLib_Open failed"), "{missing}");
}

#[test]
fn injected_failures_map_to_their_classes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.raw");
    image(&path, MIB, &[(0, MIB)]);
    let open =
        |vm: &str| vddk().connect(&local(vm)).unwrap().open(path.to_str().unwrap(), OpenFlags::default()).unwrap();

    let disk = open("vm-4;fail-read=3");
    let results: Vec<bool> = (0..5).map(|i| disk.read(i, vec![0; 512]).is_ok()).collect();
    assert_eq!(results, [true, true, false, true, true], "the third read fails, once");

    let disk = open("vm-5;lose-connection=2");
    assert!(disk.read(0, vec![0; 512]).is_ok());
    for _ in 0..3 {
        let e = disk.read(0, vec![0; 512]).unwrap_err();
        assert_eq!(e.class(), ErrorClass::Network, "{e}");
        assert!(e.class().is_retryable());
    }

    let disk = open("vm-6;delay-us=30000");
    let started = Instant::now();
    disk.read(0, vec![0; 512]).unwrap();
    assert!(started.elapsed().as_millis() >= 30);

    // Completions on another thread, retired by Wait.
    let disk = open("vm-7;async-thread=1");
    let bufs = disk.read_async((0..16).map(|i| (i * 128, vec![0u8; 65536])).collect()).unwrap();
    let direct = std::fs::read(&path).unwrap();
    assert!(bufs.concat() == direct, "async-thread reads differ");
}

#[test]
fn several_disks_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<_> = (0..4u64)
        .map(|i| {
            let p = dir.path().join(format!("d{i}.raw"));
            let c = image(&p, 4 * MIB, &[(i * MIB, MIB), (3 * MIB + i, 1000)]);
            (p, c)
        })
        .collect();
    std::thread::scope(|s| {
        for (i, (path, contents)) in files.iter().enumerate() {
            s.spawn(move || {
                // Each thread connects, opens, reads and closes: the fake aborts the process if
                // two Opens or Closes ever overlap, or a handle is used from two threads.
                for round in 0..3 {
                    let conn = vddk().connect(&local(&format!("vm-{i}-{round}"))).unwrap();
                    let disk = conn
                        .open(path.to_str().unwrap(), OpenFlags { read_only: true, ..OpenFlags::default() })
                        .unwrap();
                    assert!(read_all(&disk, MIB) == *contents);
                }
            });
        }
    });
}

#[test]
fn remote_parameters_transports_and_secrets() {
    // The fake refuses a remote connection without credentials, as VDDK would fail.
    let bare = ConnectParams { server: Some("vc.example".into()), ..local("vm-8") };
    assert!(vddk().connect(&bare).is_err());
    let params = ConnectParams {
        server: Some("vc.example".into()),
        thumbprint: Some("AA:BB".into()),
        credentials: Some(Credentials::Password { user: "backup".into(), password: "hunter2".into() }),
        transports: vec!["nbdssl".into(), "nbd".into()],
        snapshot_moref: Some("snapshot-42".into()),
        ..local("vm-9")
    };
    assert!(!format!("{params:?}").contains("hunter2"), "the password leaked into Debug");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.raw");
    image(&path, MIB, &[]);
    let conn = vddk().connect(&params).unwrap();
    let disk = conn.open(path.to_str().unwrap(), OpenFlags { read_only: true, ..OpenFlags::default() }).unwrap();
    assert_eq!(disk.transport(), "nbdssl");
    assert!(vddk().transport_modes().contains("nbdssl"));
    vddk().prepare_for_access(&params, "syncproxy").unwrap();
    vddk().end_access(&params, "syncproxy").unwrap();
    assert_eq!(vddk().cleanup(&params).unwrap(), (0, 0));
    assert!(matches!(Library::load(&libdir(Fake::V8)).unwrap().init(None), Err(VddkError::AlreadyInitialised)));
}
