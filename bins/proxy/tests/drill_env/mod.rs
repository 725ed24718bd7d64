//! What the `proxy drill` tests share: simulated VMs holding the boot-disk fixtures, backed up
//! with `proxy backup`, and the `proxy` command run against their repository.

use std::path::PathBuf;
use std::process::Command;

use repo::Repo;
use testkit::bootdisk::{self, BootDisk, Variant};
use vsphere::Thumbprint;
use vsphere_sim::{Config, Sim, SimTls};

/// One simulated VM: its name, the fixture on its disk, its controller, its firmware lines.
pub(crate) struct Guest {
    pub(crate) name: &'static str,
    pub(crate) disk: BootDisk,
    pub(crate) controller: &'static str,
    pub(crate) vmx_extra: String,
}

/// The fixtures the test needs, or `None` (skipped loudly; failed under CI) when QEMU or a
/// fixture's packages are missing.
pub(crate) fn guests(test: &str, which: &[(&'static str, Variant, &'static str, Variant)]) -> Option<Vec<Guest>> {
    testkit::require_tool("qemu-system-x86_64", test)?;
    testkit::require_tool("qemu-img", test)?;
    let mut out = Vec::new();
    for &(name, image, controller, firmware) in which {
        let disk = bootdisk::require(image, test)?;
        out.push(Guest { name, disk, controller, vmx_extra: bootdisk::vmx_hardware(firmware) });
    }
    Some(out)
}

pub(crate) struct Env {
    pub(crate) dir: tempfile::TempDir,
    _sim: Sim,
    url: String,
    thumbprint: String,
}

impl Env {
    pub(crate) async fn start(guests: &[Guest]) -> Self {
        vsphere::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let mut toml = String::from(
            "user = \"backup@vsphere.local\"\npassword = \"pw\"\n[[datacenter]]\nname = \"DC1\"\n\
             [[datacenter.host]]\nname = \"esx1\"\n[[datacenter.datastore]]\nname = \"ds1\"\n",
        );
        for g in guests {
            toml.push_str(&format!(
                "[[datacenter.vm]]\nname = \"{}\"\ncbt = true\ncontroller = \"{}\"\nvmx_extra = '''\n{}'''\n\
                 [[datacenter.vm.disk]]\nimage = \"{}\"\n",
                g.name,
                g.controller,
                g.vmx_extra,
                g.disk.path.display()
            ));
        }
        let sim =
            Sim::start(Config::from_toml(&toml).unwrap(), &dir.path().join("sim"), SimTls::SelfSigned).await.unwrap();
        let thumbprint = Thumbprint::sha256_of(sim.certificate().unwrap()).to_string();
        let env = Self { url: sim.url(), _sim: sim, dir, thumbprint };
        std::fs::create_dir_all(env.tmp()).unwrap();
        env
    }

    pub(crate) fn repo_path(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    /// Where the drills' work folders go (the process's temporary folder).
    pub(crate) fn tmp(&self) -> PathBuf {
        self.dir.path().join("tmp")
    }

    pub(crate) fn proxy(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_proxy"));
        c.args(args).env("TMPDIR", self.tmp()).env("SYNCPROXY_PASSWORD", "pw");
        c
    }

    pub(crate) async fn backup(&self) {
        let repo = self.repo_path();
        Repo::init(&repo, 1 << 20).unwrap();
        let c = self.proxy(&[
            "backup",
            "--url",
            &self.url,
            "--user",
            "backup@vsphere.local",
            "--thumbprint",
            &self.thumbprint,
            &repo.display().to_string(),
            "--all",
        ]);
        let (code, out, err) = output(c).await;
        assert_eq!(code, 0, "backup: {out}\n{err}");
    }

    /// The newest restore point of VM `vm`.
    pub(crate) fn point(&self, vm: &str) -> repo::Manifest {
        let repo = Repo::open(self.repo_path()).unwrap();
        repo.points().unwrap().into_iter().rfind(|p| p.source.name == vm).unwrap()
    }

    pub(crate) fn drill(&self, point: &str, args: &[&str]) -> Command {
        let repo = self.repo_path().display().to_string();
        let mut all = vec!["drill", repo.as_str(), point];
        all.extend_from_slice(args);
        self.proxy(&all)
    }

    /// Nothing of a drill is left: no work folder, and no QEMU whose arguments name one.
    pub(crate) fn assert_nothing_left(&self) {
        let left: Vec<_> = std::fs::read_dir(self.tmp()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "drill work folders left in {}: {left:?}", self.tmp().display());
        let ps = Command::new("pgrep").args(["-f", &self.tmp().display().to_string()]).output().unwrap();
        assert!(ps.stdout.is_empty(), "a QEMU of the drill still runs: {}", String::from_utf8_lossy(&ps.stdout));
    }
}

/// Runs a command off the async workers (the simulator lives on them).
pub(crate) async fn output(mut c: Command) -> (i32, String, String) {
    let out = tokio::task::spawn_blocking(move || c.output().unwrap()).await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
