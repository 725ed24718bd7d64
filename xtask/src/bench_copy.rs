//! `cargo xtask bench copy`: `proxy disk-copy` side by side with nbdcopy, `qemu-img convert`
//! and `cp --sparse=always` on the same generated images, alternating runs, every timing ending
//! with the data durable (`&& sync` for every tool, ours included). Prints the median wall
//! time, client CPU, server CPU, peak RSS and our ratio against each peer. For the tmpfs rows
//! it also prints a bound: the best ratio any client could reach here if it spent only the
//! measured floor (socket receive, tmpfs `pwrite`, BLAKE3) and the server what it spent for
//! nbdcopy, with every core busy.
//!
//! Last, the fragmented image of issue 26 (about 40 % data in 1,000+ extents of 4 KiB to 4 MiB,
//! off the MiB, some written as zeros): time against nbdcopy durable into a file on disk, then
//! for each tool the bytes it read from the source, wrote and zeroed into an empty NBD target
//! (nbdkit's log filter, exact), and what its destination file holds allocated, against the
//! issue's targets. A copy that differs from the source fails the bench.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use anyhow::{Context, Result, bail};

const MIB: u64 = 1 << 20;

/// One timed run of a shell command: wall, user+sys CPU of it and its children, peak RSS.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sample {
    pub(crate) wall: f64,
    cpu: f64,
    rss_mib: f64,
    pub(crate) server_cpu: f64,
}

impl Sample {
    /// User + system seconds of the command and its children.
    pub(crate) fn cpu(&self) -> f64 {
        self.cpu
    }

    /// The largest peak RSS of the command and its children, in MiB.
    pub(crate) fn rss_mib(&self) -> f64 {
        self.rss_mib
    }
}

/// Runs `script` under `sh -c` inside a Python wrapper that reports the children's resource
/// use (std has no wait4 with rusage, and `unsafe` stays out of xtask).
pub(crate) fn measure(script: &str, server: Option<u32>) -> Result<Sample> {
    const WRAP: &str = "import resource,subprocess,sys,time\n\
t=time.monotonic()\n\
r=subprocess.run(['sh','-c',sys.argv[1]],stdout=subprocess.DEVNULL)\n\
w=time.monotonic()-t\n\
u=resource.getrusage(resource.RUSAGE_CHILDREN)\n\
print(w, u.ru_utime+u.ru_stime, u.ru_maxrss/1024.0)\n\
sys.exit(r.returncode)";
    let before = server.map(server_cpu).transpose()?;
    let out = crate::output(Command::new("python3").args(["-c", WRAP, script]))
        .with_context(|| format!("running {script}"))?;
    let v: Vec<f64> = out.split_whitespace().filter_map(|s| s.parse().ok()).collect();
    if v.len() != 3 {
        bail!("unexpected measurement {out:?}");
    }
    let server_cpu = match (server, before) {
        (Some(pid), Some(b)) => server_cpu(pid)? - b,
        _ => 0.0,
    };
    Ok(Sample { wall: v[0], cpu: v[1], rss_mib: v[2], server_cpu })
}

/// User + system seconds a process (and its reaped threads) has used, from /proc.
fn server_cpu(pid: u32) -> Result<f64> {
    stat_cpu(&format!("/proc/{pid}/stat"))
}

/// User + system seconds from a `/proc/.../stat` file.
fn stat_cpu(path: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(path)?;
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|s| s.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    Ok(ticks / 100.0)
}

/// Starts a deterministic image of `size` bytes at `path`: the file (sized, sparse) and a
/// pseudo-random generator from `seed`; `None` when an image of that size is there already.
pub(crate) fn new_image(path: &Path, size: u64, seed: u64) -> Result<Option<(File, impl FnMut() -> u64)>> {
    if path.metadata().is_ok_and(|m| m.len() == size) {
        return Ok(None);
    }
    let f = File::create(path)?;
    f.set_len(size)?;
    Ok(Some((f, xorshift(seed))))
}

/// A deterministic pseudo-random generator (xorshift64) from `seed`.
pub(crate) fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// A deterministic sparse image: `data_mib` random 1 MiB extents at random 1 MiB slots.
fn make_image(path: &Path, size: u64, data_mib: u64, seed: u64) -> Result<()> {
    let Some((f, mut next)) = new_image(path, size, seed)? else { return Ok(()) };
    let slots = size / MIB;
    let mut order: Vec<u64> = (0..slots).collect();
    for i in (1..order.len()).rev() {
        let j = usize::try_from(next() % (i as u64 + 1))?;
        order.swap(i, j);
    }
    let mut block = vec![0u8; 1 << 20];
    for &slot in order.iter().take(usize::try_from(data_mib)?) {
        for c in block.chunks_mut(8) {
            c.copy_from_slice(&next().to_le_bytes());
        }
        f.write_all_at(&block, slot * MIB)?;
    }
    f.sync_all()?;
    Ok(())
}

/// The size of the fragmented image: 2 GiB, or 256 MiB for the small (CI) runs.
pub(crate) fn fragmented_size(small: bool) -> u64 {
    if small { 256 * MIB } else { 2 << 30 }
}

/// A fragmented disk: about 40 % data in extents of 4 KiB up to 4 MiB (`size / 1024` below
/// 2 GiB, so a small image still has 1,000+: about 1,700 in 256 MiB, 1,400 in 2 GiB), log-uniform, at 4 KiB-aligned offsets (so rarely on a MiB boundary), each followed by a
/// hole of 4 KiB to three times its length. One extent in eight is written as zero bytes:
/// allocated, so SEEK_DATA reports it as data. The others are half random bytes, half
/// text-like runs, as `bench_repo::make_image` writes.
pub(crate) fn make_fragmented(path: &Path, size: u64, seed: u64) -> Result<()> {
    const PAGE: u64 = 4096;
    let Some((f, mut next)) = new_image(path, size, seed)? else { return Ok(()) };
    let max = if size >= 2 << 30 { 4 * MIB } else { (size / 1024).max(64 << 10) };
    let steps = (max / PAGE).ilog2();
    let text = b"syncproxy restore point of a virtual disk, block after block; ";
    let mut block = vec![0u8; usize::try_from(max)?];
    let mut at = (next() % 64 + 1) * PAGE;
    loop {
        // An octave of pages [2^k, 2^(k+1)) with k uniform, then uniform within it: about
        // log-uniform from 4 KiB to `max`.
        let k = next() % u64::from(steps);
        let len = (((1 << k) + next() % (1 << k)) * PAGE).min(max);
        if at + len > size {
            break;
        }
        let buf = &mut block[..usize::try_from(len)?];
        if next() % 8 == 0 {
            buf.fill(0);
        } else {
            let (random, textual) = buf.split_at_mut(buf.len() / 2);
            for c in random.chunks_mut(8) {
                c.copy_from_slice(&next().to_le_bytes());
            }
            let shift = usize::try_from(next() % text.len() as u64)?;
            for (i, b) in textual.iter_mut().enumerate() {
                *b = text[(i + shift) % text.len()];
            }
        }
        f.write_all_at(buf, at)?;
        at += len + (next() % (3 * len / PAGE) + 1) * PAGE;
    }
    f.sync_all()?;
    Ok(())
}

/// The data extents of `path` as SEEK_DATA / SEEK_HOLE report them: (offset, length).
pub(crate) fn data_extents(path: &Path) -> Result<Vec<(u64, u64)>> {
    use rustix::fs::{SeekFrom, seek};
    let f = File::open(path)?;
    let size = f.metadata()?.len();
    let mut out = Vec::new();
    let mut at = 0;
    while at < size {
        let Ok(start) = seek(&f, SeekFrom::Data(at)) else { break };
        let end = seek(&f, SeekFrom::Hole(start))?;
        out.push((start, end - start));
        at = end;
    }
    Ok(out)
}

/// The bytes `path` has allocated on its filesystem (st_blocks × 512).
pub(crate) fn allocated(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(path.metadata()?.blocks() * 512)
}

/// What the clients of an nbdkit export asked of it, summed from its log filter's file
/// (exact, where the stats filter rounds to two decimals of a MiB or GiB).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct NbdCounts {
    pub(crate) read: u64,
    pub(crate) reads: u64,
    pub(crate) write: u64,
    pub(crate) zero: u64,
    pub(crate) trim: u64,
}

impl NbdCounts {
    /// Sums the `count=` of every request line of an nbdkit log filter file.
    pub(crate) fn from_log(path: &Path) -> Result<Self> {
        let log = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut c = Self::default();
        for line in log.lines() {
            let mut words = line.split_whitespace();
            let Some(op) = words.find(|w| matches!(*w, "Read" | "Write" | "Zero" | "Trim")) else { continue };
            let Some(n) = words.find_map(|w| w.strip_prefix("count=0x")).and_then(|h| u64::from_str_radix(h, 16).ok())
            else {
                continue;
            };
            match op {
                "Read" => {
                    c.read += n;
                    c.reads += 1;
                }
                "Write" => c.write += n,
                "Zero" => c.zero += n,
                _ => c.trim += n,
            }
        }
        Ok(c)
    }
}

/// A captive nbdkit serving `image` (file plugin, log filter into `log`) on a fresh Unix
/// socket, which runs `script` with the export's URI in `$uri` and exits when it does.
/// (`$uri` is made here from `$unixsocket`: nbdkit's own, `nbd+unix://?socket=`, has no `/`
/// before the empty export name, which `proxy` refuses.)
pub(crate) fn nbdkit_run(image: &Path, log: &Path, read_only: bool, script: &str) -> String {
    format!(
        "nbdkit -U - {}--filter=log file file={} logfile={} --run 'uri=\"nbd+unix:///?socket=$unixsocket\"; {}'",
        if read_only { "-r " } else { "" },
        image.display(),
        log.display(),
        script.replace('\'', r"'\''")
    )
}

/// Reads the data extents of `path` (SEEK_DATA / SEEK_HOLE), never its holes.
fn warm_data(path: &Path) -> Result<()> {
    use rustix::fs::{SeekFrom, seek};
    let f = File::open(path)?;
    let size = f.metadata()?.len();
    let mut buf = vec![0u8; 4 << 20];
    let mut at = 0;
    while at < size {
        let Ok(start) = seek(&f, SeekFrom::Data(at)) else { break };
        let end = seek(&f, SeekFrom::Hole(start))?;
        let mut pos = start;
        while pos < end {
            let n = usize::try_from((end - pos).min(buf.len() as u64))?;
            f.read_exact_at(&mut buf[..n], pos)?;
            pos += n as u64;
        }
        at = end;
    }
    Ok(())
}

fn free_bytes(path: &Path) -> Result<u64> {
    let s = rustix::fs::statvfs(path)?;
    Ok(s.f_bavail * s.f_frsize)
}

/// A server for the duration of some rows.
struct Server {
    child: Child,
    uri: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(cmd: &mut Command, uri: String, probe: &dyn Fn() -> bool) -> Result<Self> {
        let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        let s = Self { child, uri };
        let t = std::time::Instant::now();
        while !probe() {
            if t.elapsed().as_secs() > 10 {
                bail!("{cmd:?} did not start");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(s)
    }

    fn unix(cmd: &mut Command, sock: &Path) -> Result<Self> {
        // A socket left by a killed earlier run would make the server refuse to start.
        let _ = std::fs::remove_file(sock);
        let p = sock.to_path_buf();
        Self::start(cmd, format!("nbd+unix:///?socket={}", sock.display()), &move || {
            std::os::unix::net::UnixStream::connect(&p).is_ok()
        })
    }

    fn tcp(cmd: &mut Command, port: u16) -> Result<Self> {
        Self::start(cmd, format!("nbd://127.0.0.1:{port}"), &move || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn qemu_nbd(image: &Path, extra: &[String]) -> Command {
    let mut c = Command::new("qemu-nbd");
    c.args(["-f", "raw", "--persistent", "--shared=8", "--cache=writeback"]).args(extra).arg(image);
    c
}

fn nbdkit(image: &Path, extra: &[String]) -> Command {
    let mut c = Command::new("nbdkit");
    c.args(["--foreground", "--exit-with-parent"]).args(extra).arg("file").arg(format!("file={}", image.display()));
    c
}

/// One comparison: our command against a peer's, with what to do before each run.
struct Row<'a> {
    name: String,
    data_bytes: u64,
    ours: String,
    peer: String,
    peer_name: &'a str,
    reset: String,
    server: Option<u32>,
}

fn median_of(v: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    let mut x: Vec<f64> = v.iter().map(f).collect();
    crate::median(&mut x)
}

/// The medians of one row: both walls, and the peer's client and server CPU.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    ours: f64,
    peer: f64,
    peer_cpu: f64,
    peer_server: f64,
}

fn run_row(row: &Row<'_>, rounds: usize) -> Result<Outcome> {
    if let Ok(only) = std::env::var("BENCH_COPY_ONLY")
        && !format!("{} vs {}", row.name, row.peer_name).contains(&only)
    {
        return Ok(Outcome { ours: f64::NAN, peer: f64::NAN, peer_cpu: f64::NAN, peer_server: f64::NAN });
    }
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    // A warm-up of each, then alternate, so drift on a noisy machine hits both alike.
    for round in 0..=rounds {
        for (which, script) in [(0, &row.ours), (1, &row.peer)] {
            crate::output(Command::new("sh").args(["-c", &row.reset]))?;
            let s = measure(script, row.server)?;
            if round > 0 {
                if which == 0 { ours.push(s) } else { peer.push(s) }
            }
        }
    }
    let mb = row.data_bytes as f64 / 1e6;
    let line = |who: &str, v: &[Sample]| {
        let wall = median_of(v, |s| s.wall);
        println!(
            "  {who:<10} {wall:7.3} s  {:8.0} MB/s  client CPU {:5.2} s ({:4.2} s/GB)  server CPU {:5.2} s  peak RSS {:6.1} MiB",
            mb / wall,
            median_of(v, |s| s.cpu),
            median_of(v, |s| s.cpu) / (mb / 1e3),
            median_of(v, |s| s.server_cpu),
            median_of(v, |s| s.rss_mib)
        );
        wall
    };
    println!("{}", row.name);
    let a = line("proxy", &ours);
    let b = line(row.peer_name, &peer);
    println!("  ratio: proxy is {:.2}x {}'s throughput", b / a, row.peer_name);
    Ok(Outcome {
        ours: a,
        peer: b,
        peer_cpu: median_of(&peer, |s| s.cpu),
        peer_server: median_of(&peer, |s| s.server_cpu),
    })
}

/// What any NBD-to-tmpfs copy's client must spend on this machine, in CPU-seconds per GB,
/// measured here with nothing else in the way: receiving from a Unix socket into a buffer,
/// writing data into a tmpfs file with `pwrite`, and BLAKE3 over data in cache. A real copy
/// also has request headers, wake-ups and zero detection, so its true floor is higher.
#[derive(Debug, Clone, Copy)]
struct Floor {
    receive: f64,
    write: f64,
    blake3: f64,
}

/// CPU-seconds this process has used.
fn own_cpu() -> Result<f64> {
    server_cpu(std::process::id())
}

/// CPU-seconds the calling thread has used.
fn thread_cpu() -> Result<f64> {
    stat_cpu("/proc/thread-self/stat")
}

/// The receiving side's CPU per GB for `bytes` sent through a Unix socket in 256 KiB writes
/// (nbdkit's replies to 256 KiB reads) and read into a 4 MiB buffer.
fn receive_floor(bytes: u64) -> Result<f64> {
    use std::io::{Read, Write};
    let (mut tx, mut rx) = std::os::unix::net::UnixStream::pair()?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let piece = vec![0x5au8; 256 << 10];
        let mut sent = 0;
        while sent < bytes {
            tx.write_all(&piece)?;
            sent += piece.len() as u64;
        }
        Ok(())
    });
    let mut buf = vec![0u8; 4 << 20];
    let t = thread_cpu()?;
    let mut got = 0;
    while got < bytes {
        let n = usize::try_from((bytes - got).min(buf.len() as u64))?;
        rx.read_exact(&mut buf[..n])?;
        got += n as u64;
    }
    let cpu = thread_cpu()? - t;
    sender.join().map_err(|_| anyhow::anyhow!("the socket sender panicked"))??;
    Ok(cpu / (got as f64 / 1e9))
}

fn measure_floor(dir: &Path, bytes: u64) -> Result<Floor> {
    let mut next = xorshift(3);
    let mut chunk = vec![0u8; 4 << 20];
    for c in chunk.chunks_mut(8) {
        c.copy_from_slice(&next().to_le_bytes());
    }
    let path = dir.join("floor.raw");
    let f = File::create(&path)?;
    let t = own_cpu()?;
    let mut at = 0;
    while at < bytes {
        f.write_all_at(&chunk, at)?;
        at += chunk.len() as u64;
    }
    let write = (own_cpu()? - t) / (at as f64 / 1e9);
    drop(f);
    std::fs::remove_file(&path)?;
    let t = own_cpu()?;
    let mut hashed = 0u64;
    let mut sink = 0u8;
    while hashed < bytes {
        for block in chunk.chunks(1 << 20) {
            sink ^= blake3::hash(block).as_bytes()[0];
        }
        hashed += chunk.len() as u64;
    }
    std::hint::black_box(sink);
    let blake3 = (own_cpu()? - t) / (hashed as f64 / 1e9);
    Ok(Floor { receive: receive_floor(bytes)?, write, blake3 })
}

/// The best ratio against the peer that any copy could reach on `cores` cores, if its client
/// spent only `floor` CPU-seconds per GB and the server what it spent for the peer.
fn print_bound(o: &Outcome, floor: f64, data_bytes: u64, cores: f64) {
    let gb = data_bytes as f64 / 1e9;
    let best_wall = (floor * gb + o.peer_server) / cores;
    println!(
        "  bound: a client spending only the floor, {floor:.2} s/GB (nbdcopy spent {:.2}), with the server's {:.2} s on {cores} cores, needs {best_wall:.3} s: at most {:.2}x nbdcopy",
        o.peer_cpu / gb,
        o.peer_server,
        o.peer / best_wall
    );
}

pub(crate) fn run(root: &Path) -> Result<()> {
    let small = std::env::var("BENCH_COPY_SMALL").is_ok_and(|v| v == "1");
    let rounds: usize =
        std::env::var("BENCH_COPY_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(if small { 1 } else { 3 });
    let (big, small_img) = if small { (512 * MIB, 256 * MIB) } else { (16 << 30, 4 << 30) };
    let dir = crate::target_dir(root).join("bench-copy");
    std::fs::create_dir_all(&dir)?;
    let shm = PathBuf::from("/dev/shm/syncproxy-bench");
    // Images (data only), one output at a time, an NBD target and slack.
    let need = small_img / 2 + big / 10 + 2 * (small_img / 2) + big / 10 + 2 * (1 << 30) / if small { 16 } else { 1 };
    let have = free_bytes(&dir)?;
    if have < need {
        bail!("bench copy needs about {} GiB free under {} and has {} GiB", need >> 30, dir.display(), have >> 30);
    }
    // The floor is measured over at least 512 MiB, so a 10 ms clock tick stays small beside it.
    let floor_bytes = (small_img / 2).max(512 * MIB);
    let shm_have = free_bytes(Path::new("/dev/shm"))?;
    if shm_have < floor_bytes + (256 << 20) {
        bail!(
            "bench copy needs about {} MiB free in /dev/shm and has {} MiB",
            (floor_bytes + (256 << 20)) >> 20,
            shm_have >> 20
        );
    }
    for tool in ["nbdcopy", "nbdkit", "qemu-nbd", "qemu-img", "python3"] {
        crate::output(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
            .with_context(|| format!("bench copy needs {tool} (apt: libnbd-bin, nbdkit, qemu-utils, python3)"))?;
    }
    crate::cargo(&["build", "--release", "--locked", "-p", "proxy"])?;
    let proxy = crate::target_dir(root).join("release/proxy");
    let proxy = proxy.display();

    // Named by size, so the small CI run never replaces the full-size images.
    let img4 = dir.join(format!("img-{}m-50pct.raw", small_img >> 20));
    let img16 = dir.join(format!("img-{}m-10pct.raw", big >> 20));
    println!("making images in {} (deterministic; reused when present)", dir.display());
    make_image(&img4, small_img, small_img / MIB / 2, 1)?;
    make_image(&img16, big, big / MIB / 10, 2)?;
    // Warm the page cache with the sources' data, as the baselines do. Reading the holes too
    // (`cat`) would fill 14 GiB of cache with zero pages, which every later write into tmpfs
    // then has to reclaim, slowing whichever tool runs into it.
    for img in [&img4, &img16] {
        warm_data(img)?;
    }
    std::fs::create_dir_all(&shm)?;
    let floor = measure_floor(&shm, floor_bytes)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    println!(
        "client floor on this machine (CPU-s per GB of any NBD-to-tmpfs copy): receive {:.2}, pwrite {:.2}, BLAKE3 {:.2}",
        floor.receive, floor.write, floor.blake3
    );
    let out = dir.join("out.raw");
    let shm_out = shm.join("out.raw");
    let rm = |p: &Path| format!("rm -rf {p} {p}.syncproxy; sync", p = p.display());
    let d4 = small_img / 2;
    let d16 = big / 10;
    let port = |base: u16| if small { base + 1000 } else { base };

    let mut ratios = Vec::new();
    {
        let (qs, ks) = (dir.join("qw.sock"), dir.join("ku.sock"));
        let qemu = Server::unix(&mut qemu_nbd(&img4, &args(&["-r", "-k", &path(&qs)])), &qs)?;
        let kit = Server::unix(&mut nbdkit(&img4, &args(&["-r", "-U", &path(&ks)])), &ks)?;
        let kit_tcp = Server::tcp(
            &mut nbdkit(&img4, &args(&["-r", "-i", "127.0.0.1", "-p", &port(10809).to_string()])),
            port(10809),
        )?;
        let qemu_tcp = Server::tcp(
            &mut qemu_nbd(&img4, &args(&["-r", "-b", "127.0.0.1", "-p", &port(10810).to_string()])),
            port(10810),
        )?;
        for (label, server) in
            [("qemu-nbd unix", &qemu), ("nbdkit unix", &kit), ("nbdkit tcp", &kit_tcp), ("qemu-nbd tcp", &qemu_tcp)]
        {
            for (target, dst) in [("file on disk", &out), ("tmpfs", &shm_out)] {
                if target == "tmpfs" && label.ends_with("tcp") {
                    continue;
                }
                // On tmpfs the engine is measured: once more without digests, to show their cost.
                let variants: &[&str] = if target == "tmpfs" { &["", " --no-digests"] } else { &[""] };
                for extra in variants {
                    let row = Row {
                        name: format!(
                            "NBD ({label}) -> {target}{extra}, {} MiB image, {} MiB data",
                            small_img >> 20,
                            d4 >> 20
                        ),
                        data_bytes: d4,
                        ours: format!(
                            "{proxy} disk-copy --no-progress{extra} '{}' {} && sync",
                            server.uri,
                            dst.display()
                        ),
                        peer: format!("nbdcopy '{}' {} && sync", server.uri, dst.display()),
                        peer_name: "nbdcopy",
                        reset: rm(dst),
                        server: Some(server.pid()),
                    };
                    let o = run_row(&row, rounds)?;
                    if target == "tmpfs" && !o.ours.is_nan() {
                        let f = floor.receive + floor.write + if extra.is_empty() { floor.blake3 } else { 0.0 };
                        print_bound(&o, f, d4, cores);
                    }
                    ratios.push((row.name.clone(), o));
                }
            }
        }
        let k16 = dir.join("k16.sock");
        let kit16 = Server::unix(&mut nbdkit(&img16, &args(&["-r", "-U", &path(&k16)])), &k16)?;
        let row = Row {
            name: format!("NBD (nbdkit unix) -> file on disk, {} MiB image, {} MiB data", big >> 20, d16 >> 20),
            data_bytes: d16,
            ours: format!("{proxy} disk-copy --no-progress '{}' {} && sync", kit16.uri, out.display()),
            peer: format!("nbdcopy '{}' {} && sync", kit16.uri, out.display()),
            peer_name: "nbdcopy",
            reset: rm(&out),
            server: Some(kit16.pid()),
        };
        ratios.push((row.name.clone(), run_row(&row, rounds)?));
    }
    for (img, data) in [(&img4, d4), (&img16, d16)] {
        let size = img.metadata()?.len();
        for (peer_name, peer) in [
            (
                "qemu-img",
                format!("qemu-img convert -m 16 -W -f raw -O raw {} {} && sync", img.display(), out.display()),
            ),
            ("cp", format!("cp --sparse=always {} {} && sync", img.display(), out.display())),
        ] {
            let row = Row {
                name: format!("file -> file, {} MiB image, {} MiB data", size >> 20, data >> 20),
                data_bytes: data,
                ours: format!("{proxy} disk-copy --no-progress {} {} && sync", img.display(), out.display()),
                peer,
                peer_name,
                reset: rm(&out),
                server: None,
            };
            ratios.push((format!("{} vs {peer_name}", row.name), run_row(&row, rounds)?));
        }
    }
    {
        let target = dir.join("target.raw");
        File::create(&target)?.set_len(small_img)?;
        let sock = dir.join("tw.sock");
        let server = Server::unix(&mut qemu_nbd(&target, &args(&["-k", &path(&sock)])), &sock)?;
        let state = dir.join("nbd-state");
        let row = Row {
            name: format!(
                "file -> NBD (qemu-nbd unix, writeback), {} MiB image, {} MiB data",
                small_img >> 20,
                d4 >> 20
            ),
            data_bytes: d4,
            ours: format!(
                "{proxy} disk-copy --no-progress --state-dir {} {} '{}' && sync",
                state.display(),
                img4.display(),
                server.uri
            ),
            peer: format!("nbdcopy {} '{}' && sync", img4.display(), server.uri),
            peer_name: "nbdcopy",
            reset: format!(
                "rm -rf {}; truncate -s 0 {t}; truncate -s {small_img} {t}; sync",
                state.display(),
                t = target.display()
            ),
            server: Some(server.pid()),
        };
        ratios.push((row.name.clone(), run_row(&row, rounds)?));
    }
    if let Some(r) = fragmented(&dir, &proxy.to_string(), small, rounds)? {
        ratios.push(r);
    }
    let _ = std::fs::remove_dir_all(&shm);
    let _ = std::fs::remove_file(&out);
    println!("\nsummary (median wall, durable; >1 means proxy is faster):");
    for (name, o) in ratios.into_iter().filter(|(_, o)| !o.ours.is_nan()) {
        println!("  {:5.2}x  {name}", o.peer / o.ours);
    }
    Ok(())
}

/// Fails unless `a` and `b` hold the same bytes.
pub(crate) fn same_bytes(a: &Path, b: &Path) -> Result<()> {
    let out = Command::new("cmp").arg(a).arg(b).output().context("running cmp")?;
    if !out.status.success() {
        bail!(
            "{} differs from {}: {}",
            b.display(),
            a.display(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned() + &String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// "met" or "NOT met".
pub(crate) fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// Bytes as MiB with two decimals.
pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / MIB as f64)
}

/// The fragmented image (issue 26): time against nbdcopy, durable into a file on disk, then,
/// untimed, what each copy read, wrote and zeroed (nbdkit's log filter on both ends) and what
/// its destination file holds allocated. Fails when a copy differs from the source.
fn fragmented(dir: &Path, proxy: &str, small: bool, rounds: usize) -> Result<Option<(String, Outcome)>> {
    let size = fragmented_size(small);
    let name = format!("fragmented NBD (nbdkit unix) -> file on disk, {} MiB image", size >> 20);
    if std::env::var("BENCH_COPY_ONLY").is_ok_and(|only| !format!("{name} vs nbdcopy").contains(&only)) {
        return Ok(None);
    }
    let img = dir.join(format!("frag-{}m.raw", size >> 20));
    make_fragmented(&img, size, 26)?;
    warm_data(&img)?;
    let extents = data_extents(&img)?;
    let data: u64 = extents.iter().map(|e| e.1).sum();
    println!(
        "\n{name}: {} in {} extents ({:.1} % of the disk; 1 in 8 written as zeros)",
        mib(data),
        extents.len(),
        100.0 * data as f64 / size as f64
    );
    let out = dir.join("out.raw");
    let rm = format!("rm -rf {p} {p}.syncproxy; sync", p = out.display());
    let sock = dir.join("frag.sock");
    let kit = Server::unix(&mut nbdkit(&img, &args(&["-r", "-U", &path(&sock)])), &sock)?;
    let ours = |src: &str, dst: &str| format!("{proxy} disk-copy --no-progress {src} {dst}");
    let theirs = |src: &str, dst: &str| format!("nbdcopy {src} {dst}");
    let row = Row {
        name: name.clone(),
        data_bytes: data,
        ours: format!("{} && sync", ours(&format!("'{}'", kit.uri), &path(&out))),
        peer: format!("{} && sync", theirs(&format!("'{}'", kit.uri), &path(&out))),
        peer_name: "nbdcopy",
        reset: rm.clone(),
        server: Some(kit.pid()),
    };
    let o = run_row(&row, rounds)?;
    // nbdcopy keeps no digests; ours keeps one BLAKE3 per 1 MiB block (the resume check of a
    // source that is not frozen), which on 2 cores is CPU the peer does not spend. Without them:
    let bare = Row {
        name: format!("{name} --no-digests"),
        ours: format!("{proxy} disk-copy --no-progress --no-digests '{}' {} && sync", kit.uri, path(&out)),
        ..row
    };
    let o_bare = run_row(&bare, rounds)?;
    drop(kit);

    // Untimed: one copy each into the file (allocation, cmp), and one between two logging
    // nbdkits (bytes read from the source; bytes written and zeroed on an empty sparse target).
    let (src_log, dst_log, target) = (dir.join("frag-src.log"), dir.join("frag-dst.log"), dir.join("frag-target.raw"));
    let mut alloc = Vec::new();
    for (who, cmd) in [("proxy", &ours as &dyn Fn(&str, &str) -> String), ("nbdcopy", &theirs)] {
        crate::output(Command::new("sh").args(["-c", &rm]))?;
        let json = if who == "proxy" { " --json" } else { "" };
        let script = nbdkit_run(&img, &src_log, true, &format!("{}{json}", cmd("\"$uri\"", &path(&out))));
        let said = crate::output(Command::new("sh").args(["-c", &script]))?;
        same_bytes(&img, &out).with_context(|| format!("{who}'s copy of the fragmented image is wrong"))?;
        let read = NbdCounts::from_log(&src_log)?;
        let on_disk = allocated(&out)?;

        let _ = std::fs::remove_file(&target);
        File::create(&target)?.set_len(size)?;
        let state = dir.join("frag-state");
        let _ = std::fs::remove_dir_all(&state);
        let dst = if who == "proxy" { format!("--state-dir {} \"$DST\"", state.display()) } else { "\"$DST\"".into() };
        let inner = nbdkit_run(&img, &src_log, true, &cmd("\"$uri\"", &dst));
        let script = nbdkit_run(&target, &dst_log, false, &format!("export DST=\"$uri\"; {inner}"));
        crate::output(Command::new("sh").args(["-c", &script]))?;
        same_bytes(&img, &target).with_context(|| format!("{who}'s copy into NBD of the fragmented image is wrong"))?;
        let wrote = NbdCounts::from_log(&dst_log)?;
        println!(
            "  {who:<10} read {} in {} requests; into NBD wrote {}, zeroed {}, trimmed {}; file copy allocates {} \
             (source data {})",
            mib(read.read),
            read.reads,
            mib(wrote.write),
            mib(wrote.zero),
            mib(wrote.trim),
            mib(on_disk),
            mib(data)
        );
        if who == "proxy" {
            // What the copy says of itself, when its summary has these fields.
            let v: serde_json::Value = serde_json::from_str(said.trim()).unwrap_or_default();
            let field = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).map_or("?".into(), mib);
            println!(
                "  {:<10} (its --json: read {}, copied {}, zero {})",
                "",
                field("read"),
                field("copied"),
                field("zero")
            );
        }
        alloc.push(on_disk);
    }
    for p in [&target, &src_log, &dst_log] {
        let _ = std::fs::remove_file(p);
    }
    let _ = std::fs::remove_dir_all(dir.join("frag-state"));
    let speed = o.peer / o.ours;
    let bare_speed = o_bare.peer / o_bare.ours;
    let over = alloc[0] as f64 / data as f64 - 1.0;
    println!(
        "  targets: speed {speed:.2}x nbdcopy with digests, {bare_speed:.2}x without (target >= 1.00: {}); allocated {} \
         = source data {:+.1} % (target <= +1 %: {})",
        met(speed >= 1.0),
        mib(alloc[0]),
        100.0 * over,
        met(over <= 0.01)
    );
    Ok(Some((name, o)))
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

fn path(p: &Path) -> String {
    p.display().to_string()
}
