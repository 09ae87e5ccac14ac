//! A real Kubernetes control plane for tests: etcd and kube-apiserver on 127.0.0.1, built
//! with Go from the module proxy at pinned releases (`tests/controlplane/go.mod`), with
//! RBAC on and service-account tokens working. No controller-manager, scheduler or
//! kubelet: tests create EndpointSlices and Nodes themselves.

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{gocache::ScratchCache, tasks::root};

/// The Kubernetes release the tests run against.
pub const KUBERNETES: &str = "v1.37.2";
/// The etcd release that Kubernetes release requires.
pub const ETCD: &str = "v3.7.0";
/// Admin bearer token of the test control plane (it only ever listens on 127.0.0.1).
const ADMIN_TOKEN: &str = "ballast-test-admin-token";

fn base() -> PathBuf {
    root().join("target").join("controlplane")
}

fn bin_dir() -> PathBuf {
    base().join(format!("bin-{KUBERNETES}-etcd-{ETCD}"))
}

fn run_dir() -> PathBuf {
    base().join("run")
}

/// Path of the admin kubeconfig `up` writes.
pub fn kubeconfig() -> PathBuf {
    base().join("admin.kubeconfig")
}

/// Builds kube-apiserver and etcd unless this version is already cached.
pub fn build() -> Result<PathBuf> {
    let dir = bin_dir();
    if dir.join("kube-apiserver").is_file() && dir.join("etcd").is_file() {
        return Ok(dir);
    }
    let module = root().join("tests").join("controlplane");
    let (major, minor) = {
        let mut parts = KUBERNETES.trim_start_matches('v').split('.');
        (parts.next().unwrap_or("1").to_string(), parts.next().unwrap_or("0").to_string())
    };
    let mut ldflags = String::new();
    for pkg in ["k8s.io/component-base/version", "k8s.io/client-go/pkg/version"] {
        ldflags.push_str(&format!(
            "-X {pkg}.gitVersion={KUBERNETES} -X {pkg}.gitMajor={major} -X {pkg}.gitMinor={minor} -X {pkg}.gitTreeState=clean "
        ));
    }
    fs::create_dir_all(&dir)?;
    eprintln!("building kube-apiserver {KUBERNETES} and etcd {ETCD} with Go (first time only; several minutes)");
    let cache = ScratchCache::new("controlplane")?;
    for (pkg, out) in
        [("k8s.io/kubernetes/cmd/kube-apiserver", "kube-apiserver"), ("go.etcd.io/etcd/server/v3", "etcd")]
    {
        let status = Command::new("go")
            .args(["build", "-trimpath", "-ldflags", &ldflags, "-o"])
            .arg(dir.join(out))
            .arg(pkg)
            .current_dir(&module)
            .env("CGO_ENABLED", "0")
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "-mod=mod")
            .env("GOCACHE", cache.path())
            .status()
            .context("running go (is Go installed?)")?;
        if !status.success() {
            bail!("go build {pkg} failed ({status})");
        }
    }
    Ok(dir)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn sh(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn spawn(program: &Path, args: &[String], log: &Path) -> Result<u32> {
    let file = fs::File::create(log)?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    Ok(child.id())
}

use std::os::unix::process::CommandExt;

fn wait_ready(what: &str, url: &str, auth: Option<&str>, log: &Path) -> Result<()> {
    let start = Instant::now();
    loop {
        let mut cmd = Command::new("curl");
        cmd.args(["-skf", "-m", "2", url]);
        if let Some(token) = auth {
            cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
        }
        if cmd.output().map(|o| o.status.success()).unwrap_or(false) {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(120) {
            let tail = fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(30).collect();
            bail!(
                "{what} not ready after 120 s; last log lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Whether a control plane started by `up` is answering.
pub fn running() -> bool {
    let Ok(server) = fs::read_to_string(run_dir().join("server")) else {
        return false;
    };
    Command::new("curl")
        .args([
            "-skf",
            "-m",
            "2",
            &format!("{}/readyz", server.trim()),
            "-H",
            &format!("Authorization: Bearer {ADMIN_TOKEN}"),
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Starts etcd and kube-apiserver and writes the admin kubeconfig.
pub fn up() -> Result<()> {
    if running() {
        eprintln!("control plane already running");
        println!("export KUBECONFIG={}", kubeconfig().display());
        return Ok(());
    }
    down()?;
    let bins = build()?;
    let run = run_dir();
    let pki = run.join("pki");
    fs::create_dir_all(&pki)?;
    let (etcd_port, peer_port, api_port) = (free_port()?, free_port()?, free_port()?);

    // Keys: service-account signing, and a CA + serving certificate for 127.0.0.1.
    let p = |f: &str| pki.join(f).display().to_string();
    sh("openssl", &["genrsa", "-out", &p("sa.key"), "2048"])?;
    sh(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=ballast-test-ca",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.crt"),
        ],
    )?;
    fs::write(pki.join("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n")?;
    sh(
        "openssl",
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=kube-apiserver",
            "-keyout",
            &p("apiserver.key"),
            "-out",
            &p("apiserver.csr"),
        ],
    )?;
    sh(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &p("apiserver.csr"),
            "-CA",
            &p("ca.crt"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            &p("san.ext"),
            "-out",
            &p("apiserver.crt"),
        ],
    )?;
    fs::write(run.join("tokens.csv"), format!("{ADMIN_TOKEN},admin,admin-uid,system:masters\n"))?;

    let etcd_log = run.join("etcd.log");
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let etcd_pid = spawn(
        &bins.join("etcd"),
        &[
            format!("--data-dir={}", run.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ],
        &etcd_log,
    )?;
    fs::write(run.join("pids"), format!("{etcd_pid}\n"))?;
    wait_ready("etcd", &format!("{etcd_url}/health"), None, &etcd_log)?;

    let api_log = run.join("kube-apiserver.log");
    let server = format!("https://127.0.0.1:{api_port}");
    let api_pid = spawn(
        &bins.join("kube-apiserver"),
        &[
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            "--authorization-mode=RBAC".into(),
            format!("--token-auth-file={}", run.join("tokens.csv").display()),
            format!("--service-account-issuer={server}"),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            format!("--service-account-key-file={}", p("sa.key")),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--allow-privileged=true".into(),
            "--disable-admission-plugins=ServiceAccount".into(),
            "--v=1".into(),
        ],
        &api_log,
    )?;
    fs::write(run.join("pids"), format!("{etcd_pid}\n{api_pid}\n"))?;
    fs::write(run.join("server"), &server)?;
    wait_ready("kube-apiserver", &format!("{server}/readyz"), Some(ADMIN_TOKEN), &api_log)?;

    let ca = fs::read(pki.join("ca.crt"))?;
    fs::write(
        kubeconfig(),
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: ballast-test\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: admin\n  user:\n    token: {ADMIN_TOKEN}\ncontexts:\n- name: ballast-test\n  context:\n    cluster: ballast-test\n    user: admin\ncurrent-context: ballast-test\n",
            base64(&ca)
        ),
    )?;
    eprintln!("control plane ready at {server} (logs in {})", run.display());
    println!("export KUBECONFIG={}", kubeconfig().display());
    Ok(())
}

/// Stops the control plane and removes its data.
pub fn down() -> Result<()> {
    let run = run_dir();
    if let Ok(pids) = fs::read_to_string(run.join("pids")) {
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()).rev() {
            // SAFETY: kill(2) on a process group we started.
            unsafe { libc::kill(-pid, libc::SIGTERM) };
        }
        std::thread::sleep(Duration::from_millis(500));
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: as above; gone processes make this a no-op.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }
    if run.exists() {
        fs::remove_dir_all(&run)?;
    }
    let _ = fs::remove_file(kubeconfig());
    Ok(())
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
