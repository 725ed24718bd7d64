//! The NBD server: an in-memory export with holes read back by our client, by a hand-written
//! client at the protocol level, and by real clients (nbdinfo, nbdcopy, qemu-img); and its
//! robustness against garbage, clients that vanish mid-request, a thousand connections at once
//! and idle clients; STARTTLS and required TLS with rustls clients.
#![expect(clippy::cast_possible_truncation, reason = "test sizes are small")]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd_wire::proto::{self, chunk, cmd, errno, opt, rep, state, tflag};
use nbd_wire::server::{BoxFuture, ExportError, ExportSource, MemoryExport, Server, ServerConfig};
use nbd_wire::{Client, NbdError, Target};
use testkit::pki::TestPki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

/// 8 MiB with data runs at these places and zeros (holes) elsewhere.
fn image() -> Vec<u8> {
    let mut all = vec![0u8; SIZE as usize];
    for (i, &(at, len)) in [(0u64, 4096u64), (MIB, 2 * MIB), (7 * MIB + 512, 10_000)].iter().enumerate() {
        for j in 0..len {
            all[(at + j) as usize] = ((j * 31 + i as u64 * 7) % 251 + 1) as u8;
        }
    }
    all
}

/// A large export that is all hole (reads as zeros), without the memory.
struct Zeros(u64);

impl ExportSource for Zeros {
    fn size(&self) -> u64 {
        self.0
    }
    fn read_at<'a>(&'a self, _: u64, buf: &'a mut [u8]) -> BoxFuture<'a, Result<(), ExportError>> {
        buf.fill(0);
        Box::pin(async { Ok(()) })
    }
    fn block_status(&self, _: u64, length: u32) -> BoxFuture<'_, Result<Vec<(u32, u32)>, ExportError>> {
        Box::pin(async move { Ok(vec![(length, state::HOLE | state::ZERO)]) })
    }
}

const BIG: u64 = 5 << 30;

struct Served {
    server: Server,
    socket: PathBuf,
    truth: Vec<u8>,
    _dir: tempfile::TempDir,
}

async fn serve(config: ServerConfig) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let truth = image();
    let small: Arc<dyn ExportSource> = Arc::new(MemoryExport::new(vec![7u8; 4096], 4096));
    let server = Server::new(
        config,
        vec![
            ("disk".into(), Arc::new(MemoryExport::new(truth.clone(), 4096)) as Arc<dyn ExportSource>),
            ("small".into(), small),
            ("big".into(), Arc::new(Zeros(BIG))),
        ],
    );
    server.serve_unix(&socket).await.unwrap();
    Served { server, socket, truth, _dir: dir }
}

fn uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// Reads the whole export with our client, 1 MiB at a time, eight reads in flight.
async fn read_all(client: &Client) -> Vec<u8> {
    let reads = (0..client.export().size / MIB).map(|i| client.read(i * MIB, MIB as u32));
    testkit::join_all(reads).await.into_iter().map(Result::unwrap).collect::<Vec<_>>().concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_reads_data_holes_and_block_status() {
    let s = serve(ServerConfig::default()).await;
    for name in ["disk", ""] {
        let client = Client::connect(&Target::Unix(s.socket.clone()), name).await.unwrap();
        let e = *client.export();
        assert_eq!(e.size, SIZE);
        assert!(e.read_only() && e.multi_conn() && e.structured, "{e:?}");
        assert!(e.allocation_context.is_some());
        assert_eq!(e.block_size, Some((1, 4096, 32 << 20)));
        assert!(read_all(&client).await == s.truth, "reads differ");
        // Block status: exactly the non-zero 4 KiB blocks are data.
        let (mut at, mut extents) = (0, Vec::new());
        while at < SIZE {
            for x in client.block_status(at, (SIZE - at).min(4 * MIB) as u32).await.unwrap() {
                at = x.offset + x.length;
                extents.push(x);
            }
        }
        let data_block = |b: u64| s.truth[(b * 4096) as usize..((b + 1) * 4096) as usize].iter().any(|&v| v != 0);
        for b in 0..SIZE / 4096 {
            let x = extents.iter().find(|x| x.offset <= b * 4096 && b * 4096 < x.offset + x.length).unwrap();
            assert_eq!(x.flags == 0, data_block(b), "block {b}: {x:?}");
            assert_eq!(x.flags != 0, x.flags == state::HOLE | state::ZERO);
        }
        assert!(extents.len() <= 7, "adjacent extents are merged: {extents:?}");
        client.flush().await.unwrap();
        assert!(matches!(client.write(0, b"x", false).await, Err(NbdError::Unsupported(_))));
        assert!(matches!(client.read(SIZE, 1).await, Err(NbdError::OutOfRange { .. })));
        client.disconnect().await.unwrap();
    }
    // Block status beyond the maximum block size: answered, as the protocol allows.
    let big = Client::connect(&Target::Unix(s.socket.clone()), "big").await.unwrap();
    let all = big.block_status(MIB, u32::MAX).await.unwrap();
    assert_eq!((all[0].offset, all[0].length, all[0].flags), (MIB, u64::from(u32::MAX), state::HOLE | state::ZERO));
    assert!(matches!(big.read(0, (32 << 20) + 1).await, Err(NbdError::Server { errno: errno::EOVERFLOW, .. })));
    let small = Client::connect(&Target::Unix(s.socket.clone()), "small").await.unwrap();
    assert_eq!(&small.read(4000, 96).await.unwrap()[..], &[7u8; 96][..]);
    let e = Client::connect(&Target::Unix(s.socket.clone()), "nope").await.unwrap_err();
    assert!(matches!(e, NbdError::Refused { code: rep::ERR_UNKNOWN, .. }), "{e}");

    // TCP: loopback only, unless the config allows more.
    let addr = s.server.serve_tcp("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let tcp = Client::connect(&Target::Tcp(addr.to_string()), "disk").await.unwrap();
    assert!(read_all(&tcp).await == s.truth);
    let e = s.server.serve_tcp("0.0.0.0:0".parse().unwrap()).await.unwrap_err();
    assert!(matches!(e, NbdError::Unsupported(_)), "{e}");
    let open = Server::new(ServerConfig { allow_remote: true, ..ServerConfig::default() }, vec![]);
    open.serve_tcp("0.0.0.0:0".parse().unwrap()).await.unwrap();
    open.shutdown().await;

    // Shutdown closes connections and the socket.
    s.server.shutdown().await;
    assert!(tcp.read(0, 512).await.is_err(), "a connection survived shutdown");
    assert!(!s.socket.exists(), "socket file left behind");
    assert!(Client::connect(&Target::Unix(s.socket.clone()), "disk").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writable_export_takes_writes_from_our_client_and_nbdcopy() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("rw.sock");
    let server = Server::new(
        ServerConfig::default(),
        vec![("rw".into(), Arc::new(MemoryExport::writable(vec![0u8; SIZE as usize], 4096)) as Arc<dyn ExportSource>)],
    );
    server.serve_unix(&socket).await.unwrap();
    let target = Target::Unix(socket.clone());
    let a = Client::connect(&target, "rw").await.unwrap();
    let e = *a.export();
    assert!(!e.read_only() && e.multi_conn() && e.flags & tflag::SEND_FUA != 0, "{e:?}");
    let pattern: Vec<u8> = (0..3 * MIB).map(|i| (i % 253) as u8 + 1).collect();
    a.write(MIB, &pattern[..2 * MIB as usize], true).await.unwrap();
    a.write(3 * MIB, &pattern[2 * MIB as usize..], false).await.unwrap();
    a.write_zeroes(2 * MIB, 4096).await.unwrap();
    a.flush().await.unwrap();
    let mut truth = vec![0u8; SIZE as usize];
    truth[MIB as usize..4 * MIB as usize].copy_from_slice(&pattern);
    truth[2 * MIB as usize..2 * MIB as usize + 4096].fill(0);
    // Another connection sees every write (multi-conn), holes included.
    let b = Client::connect(&target, "rw").await.unwrap();
    assert!(read_all(&b).await == truth, "a second connection reads other data");
    let status = b.block_status(2 * MIB, 8192).await.unwrap();
    assert_eq!(status[0].flags, state::HOLE | state::ZERO, "the zeroed block: {status:?}");
    assert!(matches!(b.write(SIZE - 1, b"xy", false).await, Err(NbdError::OutOfRange { .. })));

    // nbdcopy writes a whole image into it.
    if let Some(nbdcopy) = testkit::require_tool("nbdcopy", "a_writable_export_takes_writes_from_nbdcopy") {
        let file = dir.path().join("src.raw");
        std::fs::write(&file, image()).unwrap();
        run(nbdcopy, vec![file.display().to_string(), uri(&socket, "rw")]).await;
        assert!(read_all(&b).await == image(), "nbdcopy's writes did not land");
    }
    server.shutdown().await;
}

/// A hand-written client, to see exactly what the server sends.
/// A hand-written client, on a Unix socket unless said otherwise (TCP, TLS).
struct Raw<S = UnixStream>(S);

impl Raw {
    async fn connect(socket: &Path, client_flags: u32) -> Self {
        Raw::greet(UnixStream::connect(socket).await.unwrap(), client_flags).await
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Raw<S> {
    /// Reads the server's hello on `s` and sends `client_flags`.
    async fn greet(mut s: S, client_flags: u32) -> Self {
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello[..16], &proto::encode_server_hello(0)[..16]);
        assert_eq!(u16::from_be_bytes([hello[16], hello[17]]), proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
        s.write_all(&client_flags.to_be_bytes()).await.unwrap();
        Self(s)
    }

    async fn option(&mut self, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.0.write_all(&proto::encode_option(option, data)).await.unwrap();
        let mut replies = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.0.read_exact(&mut h).await.unwrap();
            let (o, kind, len) = proto::parse_option_reply_header(&h).unwrap();
            assert_eq!(o, option);
            let mut p = vec![0u8; len as usize];
            self.0.read_exact(&mut p).await.unwrap();
            let last = kind == rep::ACK || kind & rep::ERROR_BIT != 0;
            replies.push((kind, p));
            if last {
                return replies;
            }
        }
    }

    async fn request(&mut self, kind: u16, flags: u16, offset: u64, length: u32, cookie: u64) {
        let r = proto::Request { flags, kind, cookie, offset, length };
        self.0.write_all(&r.encode()).await.unwrap();
    }

    /// One reply header: the simple reply's error, or a chunk (flags, kind, payload).
    async fn chunk(&mut self) -> Result<(u64, u16, u16, Vec<u8>), (u64, u32)> {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h[..4]).await.unwrap();
        let len = proto::reply_header_len(u32::from_be_bytes(h[..4].try_into().unwrap())).unwrap();
        self.0.read_exact(&mut h[4..len]).await.unwrap();
        match proto::parse_reply_header(&h[..len]).unwrap() {
            proto::ReplyHeader::Simple { cookie, error } => Err((cookie, error)),
            proto::ReplyHeader::Structured { cookie, flags, kind, length } => {
                let mut p = vec![0u8; length as usize];
                self.0.read_exact(&mut p).await.unwrap();
                Ok((cookie, flags, kind, p))
            }
        }
    }

    /// The connection is closed by the server within a few seconds.
    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(tokio::time::timeout(Duration::from_secs(5), self.0.read(&mut b)).await, Ok(Ok(0) | Err(_)))
    }
}

fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&proto::info::NAME.to_be_bytes());
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protocol_as_the_spec_says() {
    let s = serve(ServerConfig::default()).await;
    let mut c = Raw::connect(&s.socket, 3).await;
    let list = c.option(opt::LIST, &[]).await;
    let names: Vec<_> = list.iter().filter(|(k, _)| *k == rep::SERVER).map(|(_, p)| p[4..].to_vec()).collect();
    assert_eq!(names, [b"big".to_vec(), b"disk".to_vec(), b"small".to_vec()]);
    assert_eq!(c.option(opt::LIST, b"x").await[0].0, rep::ERR_INVALID);
    assert_eq!(c.option(opt::STARTTLS, &[]).await[0].0, rep::ERR_UNSUP, "TLS is not offered yet");
    assert_eq!(c.option(77, b"whatever").await[0].0, rep::ERR_UNSUP);
    assert_eq!(c.option(opt::INFO, &go_data("nope")).await[0].0, rep::ERR_UNKNOWN);
    assert_eq!(c.option(opt::INFO, &[0, 0, 0, 9]).await[0].0, rep::ERR_INVALID, "name past the data");
    assert_eq!(c.option(opt::SET_META_CONTEXT, &meta_data("disk", &["base:allocation"])).await[0].0, rep::ERR_INVALID);
    let info = c.option(opt::INFO, &go_data("")).await;
    let infos: Vec<_> =
        info.iter().filter(|(k, _)| *k == rep::INFO).map(|(_, p)| proto::parse_info(p).unwrap()).collect();
    let flags = tflag::HAS_FLAGS | tflag::READ_ONLY | tflag::SEND_FLUSH | tflag::CAN_MULTI_CONN;
    assert!(infos.contains(&proto::Info::Export { size: SIZE, flags }), "{infos:?}");
    assert!(info.iter().any(|(k, p)| *k == rep::INFO && p[2..] == *b"disk"), "the default export's name");
    assert_eq!(c.option(opt::STRUCTURED_REPLY, &[]).await, [(rep::ACK, vec![])]);
    let listed = c.option(opt::LIST_META_CONTEXT, &meta_data("disk", &[])).await;
    assert_eq!(listed[0], (rep::META_CONTEXT, proto::encode_rep_meta_context(1, "base:allocation")));
    let none = c.option(opt::SET_META_CONTEXT, &meta_data("disk", &["qemu:dirty-bitmap:x"])).await;
    assert_eq!(none, [(rep::ACK, vec![])]);
    let set = c.option(opt::SET_META_CONTEXT, &meta_data("disk", &["x:y", "base:allocation"])).await;
    assert_eq!(set.len(), 2);
    let go = c.option(opt::GO, &go_data("disk")).await;
    assert_eq!(go.last().unwrap().0, rep::ACK);

    // A read without DF across data and a hole: hole chunks for the zeros, nothing lost.
    c.request(cmd::READ, 0, 0, 64 << 10, 1).await;
    let (mut got, mut holes) = (vec![0xEEu8; 64 << 10], 0);
    loop {
        let (cookie, flags, kind, p) = c.chunk().await.unwrap();
        assert_eq!(cookie, 1);
        let at = u64::from_be_bytes(p[..8].try_into().unwrap()) as usize;
        match kind {
            chunk::OFFSET_DATA => got[at..at + p.len() - 8].copy_from_slice(&p[8..]),
            chunk::OFFSET_HOLE => {
                let len = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
                got[at..at + len].fill(0);
                holes += 1;
            }
            k => panic!("chunk {k}"),
        }
        if flags & chunk::FLAG_DONE != 0 {
            break;
        }
    }
    assert!(got == s.truth[..64 << 10] && holes == 1);

    // Writes are refused (the payload is skipped and the connection goes on), as are zeroing,
    // trimming, unknown commands, oversized, empty and out-of-range requests.
    c.request(cmd::WRITE, 0, 0, 4096, 2).await;
    c.0.write_all(&[1u8; 4096]).await.unwrap();
    assert_eq!(c.chunk().await.unwrap_err(), (2, errno::EPERM));
    for (kind, code) in [(cmd::WRITE_ZEROES, errno::EPERM), (cmd::TRIM, errno::EPERM), (99, errno::EINVAL)] {
        c.request(kind, 0, 0, 4096, 3).await;
        assert_eq!(c.chunk().await.unwrap_err(), (3, code));
    }
    for (offset, length, code) in
        [(0, 1u32 << 31, errno::EOVERFLOW), (0, 0, errno::EINVAL), (SIZE - 1, 2, errno::EINVAL)]
    {
        c.request(cmd::READ, 0, offset, length, 4).await;
        let (cookie, flags, kind, p) = c.chunk().await.unwrap();
        assert_eq!((cookie, flags, kind), (4, chunk::FLAG_DONE, chunk::ERROR));
        assert_eq!(proto::parse_error_chunk(kind, &p).unwrap().0, code);
    }
    c.request(cmd::BLOCK_STATUS, proto::cflag::REQ_ONE, 8192, 1 << 20, 5).await;
    let (_, _, kind, p) = c.chunk().await.unwrap();
    assert_eq!(kind, chunk::BLOCK_STATUS);
    assert_eq!(proto::parse_block_status(&p).unwrap(), (1, vec![(MIB as u32 - 8192, state::HOLE | state::ZERO)]));
    c.request(cmd::FLUSH, 0, 0, 0, 6).await;
    assert_eq!(c.chunk().await.unwrap_err(), (6, 0));
    // A request with bad magic cannot be skipped: the server closes.
    c.0.write_all(&[0u8; 28]).await.unwrap();
    assert!(c.closed().await);

    // The old way: EXPORT_NAME, no structured replies, zero padding for a client without
    // NO_ZEROES; simple replies carry the data.
    let mut old = Raw::connect(&s.socket, 1).await;
    old.0.write_all(&proto::encode_option(opt::EXPORT_NAME, b"small")).await.unwrap();
    let mut b = [0u8; 134];
    old.0.read_exact(&mut b).await.unwrap();
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), 4096);
    assert!(b[10..].iter().all(|&z| z == 0));
    old.request(cmd::READ, 0, 0, 16, 9).await;
    assert_eq!(old.chunk().await.unwrap_err(), (9, 0));
    let mut data = [0u8; 16];
    old.0.read_exact(&mut data).await.unwrap();
    assert_eq!(data, [7u8; 16]);
    old.request(cmd::BLOCK_STATUS, 0, 0, 16, 10).await;
    assert_eq!(old.chunk().await.unwrap_err(), (10, errno::EINVAL), "no block status without negotiation");
    old.request(cmd::DISC, 0, 0, 0, 11).await;
    assert!(old.closed().await);
    // An unknown name under EXPORT_NAME closes (the option has no error reply).
    let mut unknown = Raw::connect(&s.socket, 3).await;
    unknown.0.write_all(&proto::encode_option(opt::EXPORT_NAME, b"nope")).await.unwrap();
    assert!(unknown.closed().await);
    let mut abort = Raw::connect(&s.socket, 3).await;
    assert_eq!(abort.option(opt::ABORT, &[]).await, [(rep::ACK, vec![])]);
    assert!(abort.closed().await);
    s.server.shutdown().await;
}

/// Runs a command (off the runtime's threads) and returns its stdout, failing on failure.
async fn run(tool: PathBuf, args: Vec<String>) -> String {
    let out = tokio::task::spawn_blocking(move || std::process::Command::new(&tool).args(&args).output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_sees_the_exports_and_the_holes() {
    let Some(nbdinfo) = testkit::require_tool("nbdinfo", "nbdinfo_sees_the_exports_and_the_holes") else { return };
    let s = serve(ServerConfig::default()).await;
    let info = run(nbdinfo.clone(), vec![uri(&s.socket, "disk")]).await;
    assert!(info.contains(&format!("export-size: {SIZE}")), "{info}");
    assert!(info.contains("is_read_only: true") && info.contains("can_multi_conn: true"), "{info}");
    assert!(info.contains("base:allocation"), "{info}");
    let list = run(nbdinfo.clone(), vec!["--list".into(), uri(&s.socket, "")]).await;
    assert!(list.contains("export=\"disk\"") && list.contains("export=\"small\""), "{list}");
    // The map: data where the image has it, holes (state 3) elsewhere.
    let nbdinfo_big = nbdinfo.clone();
    let map = run(nbdinfo, vec!["--map".into(), uri(&s.socket, "disk")]).await;
    let rows: Vec<(u64, u64, u32)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect();
    let expect = [
        (0, 4096, 0),
        (4096, MIB - 4096, 3),
        (MIB, 2 * MIB, 0),
        (3 * MIB, 4 * MIB, 3),
        (7 * MIB, 12288, 0),
        (7 * MIB + 12288, MIB - 12288, 3),
    ];
    assert_eq!(rows, expect, "{map}");
    // A map larger than the maximum block size is answered too (in requests of up to 4 GiB).
    let map = run(nbdinfo_big, vec!["--map".into(), uri(&s.socket, "big")]).await;
    let rows: Vec<Vec<&str>> = map.lines().map(|l| l.split_whitespace().collect()).collect();
    let total: u64 = rows.iter().map(|r| r[1].parse::<u64>().unwrap()).sum();
    assert!(total == BIG && rows.iter().all(|r| r[2] == "3"), "{map}");
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_and_qemu_img_read_the_same_bytes() {
    let tools = ["nbdcopy", "qemu-img"].map(|t| testkit::require_tool(t, "nbdcopy_and_qemu_img_read_the_same_bytes"));
    let [Some(nbdcopy), Some(qemu_img)] = tools else { return };
    let s = serve(ServerConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.raw");
    std::fs::File::create(&copy).unwrap();
    run(nbdcopy, vec![uri(&s.socket, "disk"), copy.display().to_string()]).await;
    assert!(std::fs::read(&copy).unwrap() == s.truth, "nbdcopy's copy differs");
    let raw = dir.path().join("same.raw");
    std::fs::write(&raw, &s.truth).unwrap();
    let out = run(
        qemu_img.clone(),
        vec![
            "compare".into(),
            "-f".into(),
            "raw".into(),
            "-F".into(),
            "raw".into(),
            raw.display().to_string(),
            uri(&s.socket, "disk"),
        ],
    )
    .await;
    assert!(out.contains("identical"), "{out}");
    // And qemu-img does see a difference: the comparison can fail.
    let mut other = s.truth.clone();
    other[5 * MIB as usize] = 1;
    std::fs::write(&raw, &other).unwrap();
    let args = ["compare", "-f", "raw", "-F", "raw"].map(String::from).into_iter();
    let args: Vec<String> = args.chain([raw.display().to_string(), uri(&s.socket, "disk")]).collect();
    let status =
        tokio::task::spawn_blocking(move || std::process::Command::new(&qemu_img).args(&args).output().unwrap())
            .await
            .unwrap();
    assert_eq!(status.status.code(), Some(1), "{}", String::from_utf8_lossy(&status.stdout));
    s.server.shutdown().await;
}

/// A normal client still reads a block correctly.
async fn still_serves(socket: &Path, truth: &[u8]) {
    let client = Client::connect(&Target::Unix(socket.to_owned()), "disk").await.unwrap();
    assert!(client.read(MIB, 4096).await.unwrap()[..] == truth[MIB as usize..MIB as usize + 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_clients_that_vanish_end_only_their_own_connection() {
    let s = serve(ServerConfig::default()).await;
    // Random bytes (at least a header's worth: less is a client still talking) after the
    // client flags, and after a good negotiation.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..50 {
        let noise: Vec<u8> = (0..(round * 97) % 2000 + 28)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut c = Raw::connect(&s.socket, 3).await;
        if round % 2 == 1 {
            c.option(opt::STRUCTURED_REPLY, &[]).await;
            c.option(opt::GO, &go_data("disk")).await;
        }
        let _ = c.0.write_all(&noise).await;
        assert!(c.closed().await, "garbage did not close the connection (round {round})");
    }
    still_serves(&s.socket, &s.truth).await;

    // Truncated and oversized options.
    let mut c = Raw::connect(&s.socket, 3).await;
    let mut cut = proto::encode_option(opt::GO, &go_data("disk"));
    cut.truncate(cut.len() - 3);
    c.0.write_all(&cut).await.unwrap();
    drop(c);
    let mut c = Raw::connect(&s.socket, 3).await;
    let mut huge = proto::encode_option(opt::GO, &[]);
    huge[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
    c.0.write_all(&huge).await.unwrap();
    let mut h = [0u8; 20];
    c.0.read_exact(&mut h).await.unwrap();
    assert_eq!(proto::parse_option_reply_header(&h).unwrap().1, rep::ERR_TOO_BIG);
    c.0.read_exact(&mut [0u8; 21]).await.unwrap();
    assert!(c.closed().await);

    // Mid-request: half a header, a write's payload cut short, and many reads whose replies
    // are never read.
    for how in 0..3 {
        let mut c = Raw::connect(&s.socket, 3).await;
        c.option(opt::STRUCTURED_REPLY, &[]).await;
        c.option(opt::GO, &go_data("disk")).await;
        match how {
            0 => {
                c.0.write_all(
                    &proto::Request { flags: 0, kind: cmd::READ, cookie: 1, offset: 0, length: 512 }.encode()[..13],
                )
                .await
                .unwrap()
            }
            1 => {
                c.request(cmd::WRITE, 0, 0, 1 << 20, 1).await;
                c.0.write_all(&[0u8; 1000]).await.unwrap();
            }
            _ => {
                for i in 0..64 {
                    c.request(cmd::READ, proto::cflag::DF, 0, 8 << 20, i).await;
                }
            }
        }
        drop(c);
    }
    let t = Instant::now();
    still_serves(&s.socket, &s.truth).await;
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // A write longer than the server accepts cannot be skipped safely: closed.
    let mut c = Raw::connect(&s.socket, 3).await;
    c.option(opt::GO, &go_data("disk")).await;
    c.request(cmd::WRITE, 0, 0, 1 << 31, 1).await;
    assert!(c.closed().await);
    s.server.shutdown().await;
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_are_bounded_and_idle_ones_dropped() {
    let idle = Duration::from_secs(2);
    let s = serve(ServerConfig { max_connections: 64, idle_timeout: idle, ..ServerConfig::default() }).await;
    let before = rss_kib();
    let started = Instant::now();
    let mut conns = Vec::new();
    for _ in 0..1000 {
        conns.push(UnixStream::connect(&s.socket).await.unwrap());
    }
    // Each connection either gets the hello or is closed at once; never more than 64 served.
    let outcomes = testkit::join_all(conns.into_iter().map(|mut c| async move {
        let mut hello = [0u8; 18];
        let got = tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut hello)).await;
        (matches!(got, Ok(Ok(_))), c)
    }))
    .await;
    let served: Vec<UnixStream> = outcomes.into_iter().filter(|(hello, _)| *hello).map(|(_, c)| c).collect();
    assert!(!served.is_empty() && served.len() <= 64, "{} connections served", served.len());
    let grown = rss_kib().saturating_sub(before);
    eprintln!("1,000 connections: {} served, RSS grew by {grown} KiB", served.len());
    assert!(grown < 64 << 10, "RSS grew by {grown} KiB for 1,000 connections");
    // The served ones say nothing; they are dropped after the idle timeout...
    let closed = testkit::join_all(served.into_iter().map(|mut c| async move {
        let mut b = [0u8; 1];
        matches!(tokio::time::timeout(Duration::from_secs(10), c.read(&mut b)).await, Ok(Ok(0) | Err(_)))
    }))
    .await;
    assert!(closed.iter().all(|&c| c), "an idle client was kept");
    let waited = started.elapsed();
    eprintln!("idle clients dropped {waited:?} after connecting");
    assert!(waited >= idle && waited < idle * 4, "idle clients dropped after {waited:?}");
    // ...and a normal client is served at once.
    let t = Instant::now();
    still_serves(&s.socket, &s.truth).await;
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    eprintln!("a normal client served in {:?}", t.elapsed());

    // A client trickling its options a byte at a time is still dropped.
    let mut trickle = UnixStream::connect(&s.socket).await.unwrap();
    trickle.read_exact(&mut [0u8; 18]).await.unwrap();
    let t = Instant::now();
    let mut bytes = 3u32.to_be_bytes().to_vec();
    bytes.extend(std::iter::repeat_n(proto::encode_option(opt::LIST, &[]), 100).flatten());
    for b in bytes {
        if trickle.write_all(&[b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dropped = t.elapsed();
    assert!(dropped < idle + Duration::from_secs(1), "a trickling client was kept for {dropped:?}");
    eprintln!("trickling client dropped after {dropped:?}");

    // Idle after negotiation too; a client with a request in flight is not idle.
    let client = Client::connect(&Target::Unix(s.socket.clone()), "disk").await.unwrap();
    assert!(client.read(0, 512).await.is_ok());
    tokio::time::sleep(idle + Duration::from_secs(1)).await;
    assert!(client.read(0, 512).await.is_err(), "an idle client was kept after negotiation");
    s.server.shutdown().await;
}

#[test]
fn a_whole_session_from_bytes() {
    let server = Server::new(
        ServerConfig::default(),
        vec![("d".into(), Arc::new(MemoryExport::new(vec![1u8; 8192], 4096)) as Arc<dyn ExportSource>)],
    );
    let mut input = 3u32.to_be_bytes().to_vec();
    input.extend(proto::encode_option(opt::GO, &go_data("d")));
    input.extend(proto::Request { flags: 0, kind: cmd::READ, cookie: 7, offset: 4096, length: 8 }.encode());
    let out = server.session_from_bytes(&input);
    // Hello, three INFO replies and an ACK, then a simple reply with the data.
    let simple = [&proto::encode_simple_reply(7, 0)[..], &[1u8; 8]].concat();
    assert!(out.ends_with(&simple), "{out:?}");
    assert!(server.session_from_bytes(b"garbage").len() == 18, "only the hello before the bad flags");
}

/// A server of the test image over loopback TCP with TLS (required or optional), asking for
/// client certificates from `pki`'s CA when `client_auth`.
async fn serve_tls(pki: &TestPki, required: bool, client_auth: bool) -> (Server, std::net::SocketAddr) {
    let tls = nbd_wire::tls::server_config(&pki.cert, &pki.key, client_auth.then_some(pki.ca.as_path())).unwrap();
    let config = ServerConfig {
        tls: Some(tls),
        tls_required: required,
        idle_timeout: Duration::from_secs(2),
        ..ServerConfig::default()
    };
    let disk = Arc::new(MemoryExport::new(image(), 4096)) as Arc<dyn ExportSource>;
    let server = Server::new(config, vec![("disk".into(), disk)]);
    let addr = server.serve_tcp("127.0.0.1:0".parse().unwrap()).await.unwrap();
    (server, addr)
}

/// A rustls client trusting `ca`, presenting `client` (certificate, key) when given.
fn tls_client(ca: &Path, client: Option<(&Path, &Path)>) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert).unwrap().map(Result::unwrap).collect();
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key).unwrap()).unwrap()
        }
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

type TlsRaw = Raw<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Connects over TCP, sends STARTTLS (acknowledged) and does the handshake.
async fn raw_tls(addr: std::net::SocketAddr, connector: &tokio_rustls::TlsConnector) -> std::io::Result<TlsRaw> {
    let mut plain = Raw::greet(tokio::net::TcpStream::connect(addr).await.unwrap(), 3).await;
    assert_eq!(plain.option(opt::STARTTLS, &[]).await, [(rep::ACK, vec![])]);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    Ok(Raw(connector.connect(name, plain.0).await?))
}

/// Whether the server refused this TLS client: the handshake failed, or (TLS 1.3 checks the
/// client's certificate after the client finished) the first option gets no reply.
async fn refused(attempt: std::io::Result<TlsRaw>) -> bool {
    let Ok(mut c) = attempt else { return true };
    if c.0.write_all(&proto::encode_option(opt::LIST, &[])).await.is_err() {
        return true;
    }
    // A served client would read the LIST reply (before the idle timeout closes it).
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), c.0.read_to_end(&mut rest)).await.is_ok();
    ended && rest.is_empty()
}

/// The server closes `s` within a few seconds, after sending whatever it sends (a TLS alert).
async fn ends(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> bool {
    let mut rest = Vec::new();
    matches!(tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await, Ok(Ok(_) | Err(_)))
}

/// Over TLS: a read of the first 4 KiB, in one data chunk, equals the image.
async fn reads_the_image(c: &mut TlsRaw) {
    assert_eq!(c.option(opt::STRUCTURED_REPLY, &[]).await, [(rep::ACK, vec![])]);
    assert_eq!(c.option(opt::GO, &go_data("disk")).await.last().unwrap().0, rep::ACK);
    c.request(cmd::READ, proto::cflag::DF, 0, 4096, 1).await;
    let (cookie, flags, kind, p) = c.chunk().await.unwrap();
    assert_eq!((cookie, flags, kind), (1, chunk::FLAG_DONE, chunk::OFFSET_DATA));
    assert!(p[8..] == image()[..4096], "the bytes over TLS differ");
    c.request(cmd::DISC, 0, 0, 0, 2).await;
    assert!(c.closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_upgrades_the_stream_and_negotiation_starts_again() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let (server, addr) = serve_tls(&pki, false, false).await;
    // TLS offered but optional: a plaintext client is still served.
    let plain = Client::connect(&Target::Tcp(addr.to_string()), "disk").await.unwrap();
    assert!(plain.read(0, 4096).await.unwrap()[..] == image()[..4096]);
    // Options before STARTTLS are forgotten: structured replies must be asked for again.
    let connector = tls_client(&pki.ca, None);
    let mut before = Raw::greet(tokio::net::TcpStream::connect(addr).await.unwrap(), 3).await;
    assert_eq!(before.option(opt::STRUCTURED_REPLY, &[]).await, [(rep::ACK, vec![])]);
    assert_eq!(before.option(opt::STARTTLS, b"x").await[0].0, rep::ERR_INVALID, "STARTTLS takes no data");
    assert_eq!(before.option(opt::STARTTLS, &[]).await, [(rep::ACK, vec![])]);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut c = Raw(connector.connect(name, before.0).await.unwrap());
    assert_eq!(c.option(opt::STARTTLS, &[]).await[0].0, rep::ERR_INVALID, "TLS twice");
    let meta = c.option(opt::SET_META_CONTEXT, &meta_data("disk", &["base:allocation"])).await;
    assert_eq!(meta[0].0, rep::ERR_INVALID, "structured replies were negotiated before TLS only");
    let list = c.option(opt::LIST, &[]).await;
    assert_eq!(list.iter().filter(|(k, _)| *k == rep::SERVER).count(), 1);
    reads_the_image(&mut c).await;
    // Garbage instead of a handshake, or no handshake at all, ends that connection only (the
    // silent one within the idle timeout).
    let mut garbage = Raw::greet(tokio::net::TcpStream::connect(addr).await.unwrap(), 3).await;
    assert_eq!(garbage.option(opt::STARTTLS, &[]).await, [(rep::ACK, vec![])]);
    garbage.0.write_all(&[0x16, 3, 1, 0xff, 0xff]).await.unwrap();
    garbage.0.write_all(&[0xAB; 512]).await.unwrap();
    let mut silent = Raw::greet(tokio::net::TcpStream::connect(addr).await.unwrap(), 3).await;
    assert_eq!(silent.option(opt::STARTTLS, &[]).await, [(rep::ACK, vec![])]);
    assert!(ends(&mut garbage.0).await && ends(&mut silent.0).await);
    reads_the_image(&mut raw_tls(addr, &connector).await.unwrap()).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_tls_refuses_plaintext_and_foreign_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let (server, addr) = serve_tls(&pki, true, false).await;
    let mut c = Raw::greet(tokio::net::TcpStream::connect(addr).await.unwrap(), 3).await;
    for (option, data) in [
        (opt::LIST, vec![]),
        (opt::STRUCTURED_REPLY, vec![]),
        (opt::INFO, go_data("disk")),
        (opt::GO, go_data("disk")),
        (77, b"whatever".to_vec()),
    ] {
        assert_eq!(c.option(option, &data).await[0].0, rep::ERR_TLS_REQD, "option {option}");
    }
    assert_eq!(c.option(opt::ABORT, &[]).await, [(rep::ACK, vec![])]);
    assert!(c.closed().await);
    let mut old = Raw::greet(tokio::net::TcpStream::connect(addr).await.unwrap(), 3).await;
    old.0.write_all(&proto::encode_option(opt::EXPORT_NAME, b"disk")).await.unwrap();
    assert!(old.closed().await, "EXPORT_NAME before TLS closes");
    let e = Client::connect(&Target::Tcp(addr.to_string()), "disk").await.unwrap_err();
    assert!(matches!(e, NbdError::Refused { code: rep::ERR_TLS_REQD, .. }), "{e}");
    reads_the_image(&mut raw_tls(addr, &tls_client(&pki.ca, None)).await.unwrap()).await;
    // With TLS required a non-loopback address needs no allow_remote; optional TLS does.
    server.serve_tcp("0.0.0.0:0".parse().unwrap()).await.unwrap();
    server.shutdown().await;
    let (optional, _) = serve_tls(&pki, false, false).await;
    assert!(matches!(optional.serve_tcp("0.0.0.0:0".parse().unwrap()).await, Err(NbdError::Unsupported(_))));
    optional.shutdown().await;
    let nothing = Server::new(ServerConfig { tls_required: true, ..ServerConfig::default() }, vec![]);
    assert!(matches!(nothing.serve_unix(&dir.path().join("s")).await, Err(NbdError::Unsupported(_))));

    // Client certificates: none, or one from another CA, is refused; ours is served.
    let other_dir = tempfile::tempdir().unwrap();
    let other = TestPki::create(other_dir.path());
    let (server, addr) = serve_tls(&pki, true, true).await;
    assert!(refused(raw_tls(addr, &tls_client(&pki.ca, None)).await).await, "no client certificate");
    let foreign = tls_client(&pki.ca, Some((&other.client_cert, &other.client_key)));
    assert!(refused(raw_tls(addr, &foreign).await).await, "a client certificate from another CA");
    let ours = tls_client(&pki.ca, Some((&pki.client_cert, &pki.client_key)));
    assert!(!refused(raw_tls(addr, &ours).await).await, "the check tells a served client from a refused one");
    reads_the_image(&mut raw_tls(addr, &ours).await.unwrap()).await;
    server.shutdown().await;
}
