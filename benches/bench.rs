//! Performance figures for the service: the release binary as a separate
//! process, the fake Bitbucket and the gRPC clients in this one, loopback only.
//!
//! ```sh
//! cargo build --release
//! cargo bench --bench bench -- [SCENARIO...] [OPTIONS]   # --help lists them
//! ```
//!
//! Scenarios: login-latency, overhead, cpu, memory, startup, shutdown, profile,
//! budget (the default set, in this order), faults (opt-in; `--fault-scale 0`
//! runs the same load without faults, for comparison), org and org-day
//! (opt-in: an organisation's working day of logins and refreshes with
//! permissionCacheTTL 10m or 8h; needs redis-server) and attacks
//! (opt-in: held streams, idle connections, descriptor exhaustion, big
//! upstream bodies, each against a fresh process). The binary is
//! `$BITBUCKET_CONNECTOR_BIN`, else `target/release/bitbucket-connector`.
//! Figures are printed as Markdown tables; nothing here asserts a timing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bitbucket_connector::pb;
use bitbucket_connector::pb::connector_service_client::ConnectorServiceClient;
use fake_bitbucket::{
    AdminCredential, Email, Endpoint, FakeBitbucket, Fault, Fixture, Group, Membership, User,
    Workspace, DEMO_CLIENT_ID, DEMO_REDIRECT_URI,
};
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_types::StatusExt as _;

#[path = "budget/mod.rs"]
mod budget;

const DEFAULT_SCENARIOS: &[Scenario] = &[
    Scenario::LoginLatency,
    Scenario::Overhead,
    Scenario::Cpu,
    Scenario::Memory,
    Scenario::Startup,
    Scenario::Shutdown,
    Scenario::Profile,
    Scenario::Budget,
];
const DATA_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const BENCH_ADMIN: &str = "bench-admin@example.com";
const BENCH_ADMIN_PASSWORD: &str = "bench-admin-api-token";
/// Workspaces in the bench world; users are members of the first N of them.
const WORKSPACES: usize = 100;
/// Users `bench-N`, each in N workspaces.
const USER_SIZES: &[usize] = &[1, 5, 20, 100];

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

/// Performance figures for the service, printed as Markdown (BENCHMARKS.md).
#[derive(clap::Parser)]
struct Args {
    /// The scenarios to run, in order; none: the default set (all but faults,
    /// org, org-day and attacks).
    #[arg(value_enum)]
    scenarios: Vec<Scenario>,
    /// faults: how long the load runs, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    duration: u64,
    /// faults: concurrent clients.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    clients: usize,
    /// faults: multiplies the faults' probabilities (0: none, to compare).
    #[arg(long, value_name = "F", default_value_t = 1.0)]
    fault_scale: f64,
    /// org, org-day: how many times faster than real time the simulated day
    /// runs (TTLs and intervals scaled alike).
    #[arg(long, value_name = "X", default_value_t = 960.0)]
    speedup: f64,
    /// Passed by `cargo bench` to `harness = false` targets; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Scenario {
    LoginLatency,
    Overhead,
    Cpu,
    Memory,
    Startup,
    Shutdown,
    Profile,
    Budget,
    /// Opt-in: a long load with faults injected at the fake.
    Faults,
    /// Opt-in: an organisation's working day, permissionCacheTTL 10m.
    Org,
    /// Opt-in: the same with permissionCacheTTL 8h.
    OrgDay,
    /// Opt-in: hostile and broken callers, each against a fresh process.
    Attacks,
}

impl Scenario {
    fn name(self) -> String {
        use clap::ValueEnum as _;
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }
}

fn main() {
    let mut args = <Args as clap::Parser>::parse();
    if args.scenarios.is_empty() {
        args.scenarios = DEFAULT_SCENARIOS.to_vec();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let failed = rt.block_on(async move {
        let mut failed = false;
        for &scenario in &args.scenarios {
            let s = scenario.name();
            println!("\n## {s}\n");
            let started = Instant::now();
            let r = match scenario {
                Scenario::LoginLatency => login_latency().await,
                Scenario::Overhead => overhead().await,
                Scenario::Cpu => cpu().await,
                Scenario::Memory => memory().await,
                Scenario::Startup => startup().await,
                Scenario::Shutdown => shutdown().await,
                Scenario::Profile => profile().await,
                Scenario::Faults => faults(args.duration, args.clients, args.fault_scale).await,
                Scenario::Budget => budget::calls().await,
                Scenario::Org => budget::organisation(Duration::from_secs(600), args.speedup).await,
                Scenario::OrgDay => {
                    budget::organisation(Duration::from_secs(8 * 3600), args.speedup).await
                }
                Scenario::Attacks => attacks().await,
            };
            if let Err(e) = r {
                println!("\n**{s} failed: {e}**");
                failed = true;
            }
            println!("\n({s} took {:.1} s)", started.elapsed().as_secs_f64());
        }
        failed
    });
    std::process::exit(i32::from(failed));
}

// ---------------------------------------------------------------------------
// The world, the service process, the clients

fn user_uuid(n: usize) -> String {
    format!("{{b0000000-0000-4000-8000-{n:012}}}")
}

fn username(n: usize) -> String {
    format!("bench-{n}")
}

fn slug(w: usize) -> String {
    format!("ws-{w:03}")
}

/// The demo world plus users `bench-N` in the first N of 100 workspaces, each
/// workspace with three groups (one holding all its members, one empty, one
/// with its first member), and an admin credential for all of them.
fn bench_fixture() -> Fixture {
    let mut f = Fixture::demo();
    for &n in USER_SIZES {
        f.users.push(User {
            uuid: user_uuid(n),
            username: Some(username(n)),
            nickname: username(n),
            display_name: format!("Bench User {n}"),
            account_id: format!("712020:b0000000-0000-4000-8000-{n:012}"),
            emails: vec![
                Email {
                    email: format!("old-{n}@example.com"),
                    is_primary: false,
                    is_confirmed: true,
                },
                Email {
                    email: format!("bench-{n}@example.com"),
                    is_primary: true,
                    is_confirmed: true,
                },
            ],
        });
    }
    for w in 0..WORKSPACES {
        let members: Vec<String> = USER_SIZES
            .iter()
            .filter(|&&n| n > w)
            .map(|&n| user_uuid(n))
            .collect();
        f.workspaces.push(Workspace {
            slug: slug(w),
            uuid: format!("{{c0000000-0000-4000-8000-{w:012}}}"),
            name: format!("Workspace {w}"),
            members: members
                .iter()
                .enumerate()
                .map(|(i, u)| Membership {
                    user_uuid: u.clone(),
                    permission: if i == 0 { "owner" } else { "member" }.to_string(),
                })
                .collect(),
            groups: vec![
                Group {
                    slug: "developers".into(),
                    name: "Developers".into(),
                    members: members.clone(),
                },
                Group {
                    slug: "operators".into(),
                    name: "Operators".into(),
                    members: vec![],
                },
                Group {
                    slug: "administrators".into(),
                    name: "Administrators".into(),
                    members: members.iter().take(1).cloned().collect(),
                },
            ],
        });
    }
    f.admins.push(AdminCredential {
        username: BENCH_ADMIN.into(),
        password: BENCH_ADMIN_PASSWORD.into(),
        workspaces: (0..WORKSPACES).map(slug).collect(),
    });
    f
}

/// Connector config lines for the group options with the admin credential.
fn group_options(cache_ttl: &str, whitelist: bool) -> Vec<String> {
    let mut v = vec![
        "includeTeamGroups: true".to_string(),
        "getWorkspacePermissions: true".to_string(),
        "teamGroupsAuth:".to_string(),
        format!("  username: {BENCH_ADMIN}"),
        format!("  password: {BENCH_ADMIN_PASSWORD}"),
        format!("teamGroupsCacheTTL: {cache_ttl}"),
    ];
    if whitelist {
        let teams: Vec<String> = (0..WORKSPACES).map(slug).collect();
        v.push(format!("teams: [{}]", teams.join(", ")));
    }
    v
}

#[derive(Clone)]
struct SvcOpts {
    /// Extra top-level config lines (YAML, no indentation).
    top: Vec<String>,
    connector: Vec<String>,
    grpc: Vec<String>,
    log_level: &'static str,
    upstream_timeout: &'static str,
    /// A command the binary runs under (valgrind).
    wrapper: Vec<String>,
    ready_timeout: Duration,
}

impl Default for SvcOpts {
    fn default() -> Self {
        SvcOpts {
            top: Vec::new(),
            connector: Vec::new(),
            grpc: Vec::new(),
            log_level: "info",
            upstream_timeout: "10s",
            wrapper: Vec::new(),
            ready_timeout: Duration::from_secs(10),
        }
    }
}

fn binary() -> Res<PathBuf> {
    let p = std::env::var_os("BITBUCKET_CONNECTOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/bitbucket-connector")
        });
    if !p.is_file() {
        return Err(format!(
            "{} not found: run `cargo build --release` first (or set BITBUCKET_CONNECTOR_BIN)",
            p.display()
        )
        .into());
    }
    Ok(p)
}

fn free_port() -> Res<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The service as a child process, with its config and stderr in a temp dir.
struct Svc {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    telemetry: SocketAddr,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
    /// From spawn to health SERVING.
    startup: Duration,
}

impl Svc {
    async fn start(fake: &FakeBitbucket, opts: &SvcOpts) -> Res<Svc> {
        let mut last = None;
        // A free port can be taken between probe and bind: try again then.
        for _ in 0..3 {
            match Self::try_start(fake, opts).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| "service did not start".into()))
    }

    async fn try_start(fake: &FakeBitbucket, opts: &SvcOpts) -> Res<Svc> {
        let dir = tempfile::tempdir()?;
        let addr = free_port()?;
        let telemetry = free_port()?;
        let cfg = dir.path().join("config.yaml");
        std::fs::write(&cfg, config_yaml(fake, opts, addr, telemetry))?;
        let stderr = dir.path().join("stderr.log");
        let bin = binary()?;
        let mut argv: Vec<String> = opts.wrapper.clone();
        argv.push(bin.display().to_string());
        argv.extend(["serve".into(), "-c".into(), cfg.display().to_string()]);
        let spawned = Instant::now();
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr)?)
            .env_remove("RUST_LOG")
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().ok_or("no pid")?;
        let deadline = spawned + opts.ready_timeout;
        loop {
            if health_once(addr).await == Some(1) {
                break;
            }
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(&stderr).unwrap_or_default();
                return Err(format!("service exited with {status}: {log}").into());
            }
            if Instant::now() > deadline {
                return Err("service did not become SERVING".into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let startup = spawned.elapsed();
        Ok(Svc {
            child,
            pid,
            addr,
            telemetry,
            stderr,
            _dir: dir,
            startup,
        })
    }

    async fn channel(&self) -> Res<Channel> {
        Ok(Channel::from_shared(format!("http://{}", self.addr))?
            .connect()
            .await?)
    }

    /// `n` separate HTTP/2 connections.
    async fn channels(&self, n: usize) -> Res<Vec<Channel>> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.channel().await?);
        }
        Ok(v)
    }

    fn status_kb(&self, key: &str) -> u64 {
        proc_status_kb(self.pid, key)
    }

    async fn metrics(&self) -> Res<String> {
        http_get(self.telemetry, "/metrics").await
    }

    fn sigterm(&self) -> Res<()> {
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()?
            .success();
        if ok {
            Ok(())
        } else {
            Err("kill -TERM failed".into())
        }
    }

    /// SIGTERM, then the exit status.
    async fn stop(mut self) -> Res<std::process::ExitStatus> {
        self.sigterm()?;
        Ok(tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??)
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

fn config_yaml(
    fake: &FakeBitbucket,
    opts: &SvcOpts,
    addr: SocketAddr,
    telemetry: SocketAddr,
) -> String {
    let indent = |lines: &[String], n: usize| {
        lines
            .iter()
            .map(|l| format!("{}{l}\n", " ".repeat(n)))
            .collect::<String>()
    };
    format!(
        "{top}grpc:\n  addr: {addr}\n{grpc}telemetry:\n  http: {telemetry}\nlogger:\n  level: {level}\n\
         connectorData:\n  keys: [\"{DATA_KEY}\"]\nconnectors:\n- type: bitbucket-cloud\n  \
         id: bitbucket-cloud\n  name: Bitbucket\n  config:\n    clientID: {DEMO_CLIENT_ID}\n    \
         clientSecret: demo-secret\n    redirectURI: {DEMO_REDIRECT_URI}\n    authURL: {}\n    \
         tokenURL: {}\n    apiURL: {}\n    legacyAPIURL: {}\n    upstreamTimeout: {}\n{connector}",
        fake.auth_url(),
        fake.token_url(),
        fake.api_url(),
        fake.legacy_api_url(),
        opts.upstream_timeout,
        top = indent(&opts.top, 0),
        grpc = indent(&opts.grpc, 2),
        level = opts.log_level,
        connector = indent(&opts.connector, 4),
    )
}

/// One health check on a fresh connection: the status, or None.
async fn health_once(addr: SocketAddr) -> Option<i32> {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .connect()
        .await
        .ok()?;
    health(&ch, Duration::from_secs(2)).await.ok()
}

async fn health(ch: &Channel, timeout: Duration) -> Result<i32, tonic::Status> {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    req.set_timeout(timeout);
    HealthClient::new(ch.clone())
        .check(req)
        .await
        .map(|r| r.into_inner().status)
}

fn proc_status_kb(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Open file descriptors of a process (sockets included).
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime of a process (0: this one), in seconds.
fn proc_cpu_secs(pid: u32) -> f64 {
    let (user, sys) = proc_cpu(pid);
    user + sys
}

/// (utime, stime) of a process (0: this one), in seconds.
fn proc_cpu(pid: u32) -> (f64, f64) {
    let path = if pid == 0 {
        "/proc/self/stat".to_string()
    } else {
        format!("/proc/{pid}/stat")
    };
    let s = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) / clock_ticks(), ticks(12) / clock_ticks())
}

fn fake_addr(fake: &FakeBitbucket) -> Res<SocketAddr> {
    Ok(fake
        .base_url()
        .strip_prefix("http://")
        .ok_or("fake base url")?
        .parse()?)
}

async fn http_get(addr: SocketAddr, path: &str) -> Res<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(text))
}

/// The value of a Prometheus sample whose labels include all of `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        // Not `sum()`: an f64 sum of nothing is -0.0, printed "-0" for a
        // family with no series yet.
        .fold(0.0, |a, b| a + b)
}

fn scopes(groups: bool, offline: bool) -> Option<pb::Scopes> {
    Some(pb::Scopes {
        offline_access: offline,
        groups,
    })
}

/// A login without a browser: a code minted at the fake, then HandleCallback.
async fn login(
    ch: &Channel,
    fake: &FakeBitbucket,
    user: &str,
    scopes: Option<pb::Scopes>,
    timeout: Option<Duration>,
) -> Result<pb::Identity, tonic::Status> {
    let code = fake.issue_code(DEMO_CLIENT_ID, user);
    let mut req = tonic::Request::new(pb::HandleCallbackRequest {
        scopes,
        raw_query: format!("code={code}&state=bench"),
        ..Default::default()
    });
    if let Some(t) = timeout {
        req.set_timeout(t);
    }
    ConnectorServiceClient::new(ch.clone())
        .handle_callback(req)
        .await
        .map(|r| r.into_inner().identity.unwrap_or_default())
}

/// Runs `total` logins, `concurrency` at a time, round-robin over `channels`;
/// returns how many answered OK.
async fn login_many(
    channels: &[Channel],
    fake: &FakeBitbucket,
    user: &str,
    scopes: Option<pb::Scopes>,
    total: usize,
    concurrency: usize,
) -> usize {
    let next = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..concurrency {
        let ch = channels[i % channels.len()].clone();
        let (fake, user, next, ok) = (fake.clone(), user.to_string(), next.clone(), ok.clone());
        tasks.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < total as u64 {
                if login(&ch, &fake, &user, scopes, None).await.is_ok() {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    ok.load(Ordering::Relaxed) as usize
}

/// Nearest-rank percentile of a sorted slice.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

// ---------------------------------------------------------------------------
// 1. login-latency

async fn login_latency() -> Res<()> {
    const LOGINS: usize = 40;
    const WARMUP: usize = 3;
    let fake = FakeBitbucket::start(bench_fixture()).await?;
    println!(
        "HandleCallback latency / L, sequential logins ({LOGINS} per row after {WARMUP} warm-up), \
         teams = all {WORKSPACES} workspaces, includeTeamGroups + getWorkspacePermissions + \
         teamGroupsAuth, scopes.groups. Calls = upstream requests per login (fake's count).\n"
    );
    println!(
        "| group cache | L | workspaces | median/L | p90/L | max/L | median ms | calls/login |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (cache, ttl) in [("cold (TTL 0s)", "0s"), ("warm (TTL 60s)", "60s")] {
        let svc = Svc::start(
            &fake,
            &SvcOpts {
                connector: group_options(ttl, true),
                ..Default::default()
            },
        )
        .await?;
        let ch = svc.channel().await?;
        for l_ms in [0u64, 20, 50] {
            let l = Duration::from_millis(l_ms);
            fake.set_delay(l);
            // One request straight to the fake, no service: the fixed cost of
            // the injected delay itself.
            let mut direct = Vec::new();
            for _ in 0..20 {
                let t = Instant::now();
                http_get(fake_addr(&fake)?, "/2.0/user").await?;
                direct.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            println!(
                "| {cache} | {l_ms} ms | one GET to the fake alone | | | | {:.1} | |",
                pct(&sorted(direct), 50.0)
            );
            for &n in &[1usize, 20, 100] {
                let user = username(n);
                for _ in 0..WARMUP {
                    login(&ch, &fake, &user, scopes(true, false), None).await?;
                }
                let hits0 = fake.total_hits();
                let mut times = Vec::with_capacity(LOGINS);
                for _ in 0..LOGINS {
                    let t = Instant::now();
                    let id = login(&ch, &fake, &user, scopes(true, false), None).await?;
                    times.push(t.elapsed().as_secs_f64());
                    if id.groups.len() < 3 * n {
                        return Err(format!("{user}: only {} groups", id.groups.len()).into());
                    }
                }
                let calls = (fake.total_hits() - hits0) as f64 / LOGINS as f64;
                let t = sorted(times);
                let ratio = |x: f64| {
                    if l_ms == 0 {
                        "–".to_string()
                    } else {
                        format!("{:.2}", x / l.as_secs_f64())
                    }
                };
                println!(
                    "| {cache} | {l_ms} ms | {n} | {} | {} | {} | {:.1} | {calls:.1} |",
                    ratio(pct(&t, 50.0)),
                    ratio(pct(&t, 90.0)),
                    ratio(t[t.len() - 1]),
                    pct(&t, 50.0) * 1000.0,
                );
            }
        }
        svc.stop().await?;
    }
    fake.set_delay(Duration::ZERO);
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. overhead (h2load)

struct H2load {
    rps: f64,
    succeeded: u64,
    p50_us: f64,
    p99_us: f64,
}

fn grpc_frame(msg: &impl prost::Message) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut v = Vec::with_capacity(5 + body.len());
    v.push(0);
    v.extend_from_slice(&(body.len() as u32).to_be_bytes());
    v.extend_from_slice(&body);
    v
}

async fn h2load(
    dir: &Path,
    addr: SocketAddr,
    path: &str,
    body: &Path,
    c: usize,
    m: usize,
    n: usize,
) -> Res<H2load> {
    let log = dir.join("h2load.log");
    let _ = std::fs::remove_file(&log);
    let out = Command::new("h2load")
        .arg("-d")
        .arg(body)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .args([
            "-c",
            &c.to_string(),
            "-m",
            &m.to_string(),
            "-n",
            &n.to_string(),
        ])
        .arg(format!("--log-file={}", log.display()))
        .arg(format!("http://{addr}{path}"))
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!("h2load failed: {text}").into());
    }
    // "finished in 1.23s, 8123.45 req/s, ..."
    let rps = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1)?.strip_suffix(" req/s")?.parse().ok())
        .ok_or_else(|| format!("cannot read h2load's output: {text}"))?;
    // "requests: 10 total, 10 started, 10 done, 10 succeeded, 0 failed, ..."
    let succeeded = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .and_then(|l| {
            l.split(", ")
                .find(|p| p.ends_with(" succeeded"))?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    // Per request: start (µs since epoch), HTTP status, duration (µs).
    let lat = sorted(
        std::fs::read_to_string(&log)?
            .lines()
            .filter_map(|l| l.split('\t').nth(2)?.trim().parse::<f64>().ok())
            .collect(),
    );
    Ok(H2load {
        rps,
        succeeded,
        p50_us: pct(&lat, 50.0),
        p99_us: pct(&lat, 99.0),
    })
}

async fn overhead() -> Res<()> {
    const ROUNDS: usize = 3;
    let fake = FakeBitbucket::start(bench_fixture()).await?;
    let dir = tempfile::tempdir()?;
    let login_body = dir.path().join("loginurl.bin");
    let health_body = dir.path().join("health.bin");
    std::fs::write(
        &login_body,
        grpc_frame(&pb::LoginUrlRequest {
            scopes: scopes(true, true),
            callback_url: DEMO_REDIRECT_URI.into(),
            state: "bench-state-0123456789".into(),
            connector_id: String::new(),
        }),
    )?;
    std::fs::write(
        &health_body,
        grpc_frame(&HealthCheckRequest {
            service: String::new(),
        }),
    )?;
    const LOGIN_PATH: &str = "/connector.v1.ConnectorService/LoginURL";
    const HEALTH_PATH: &str = "/grpc.health.v1.Health/Check";
    println!(
        "h2load, same server, alternating Health/Check and LoginURL, {ROUNDS} rounds per shape; \
         ratio = LoginURL req/s ÷ Health req/s of the same round. OK = the server's \
         rpc_requests_total{{method=\"LoginURL\",code=\"OK\"}} delta. Default logging \
         (info: one line per ConnectorService RPC, none for health), then logger.level warn.\n"
    );
    println!(
        "| log | c×m | round | Health req/s | p50 / p99 µs | LoginURL req/s | p50 / p99 µs | OK / sent | ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut summary = Vec::new();
    for log_level in ["info", "warn"] {
        let svc = Svc::start(
            &fake,
            &SvcOpts {
                log_level,
                ..Default::default()
            },
        )
        .await?;
        for (c, m, n) in [(1usize, 1usize, 10_000usize), (16, 10, 100_000)] {
            // One unmeasured run per path: connections, allocator, caches.
            h2load(
                dir.path(),
                svc.addr,
                HEALTH_PATH,
                &health_body,
                c,
                m,
                n / 10,
            )
            .await?;
            h2load(dir.path(), svc.addr, LOGIN_PATH, &login_body, c, m, n / 10).await?;
            let mut ratios = Vec::new();
            for round in 1..=ROUNDS {
                let h = h2load(dir.path(), svc.addr, HEALTH_PATH, &health_body, c, m, n).await?;
                let ok0 = metric(
                    &svc.metrics().await?,
                    "bitbucket_connector_rpc_requests_total",
                    &[("method", "LoginURL"), ("code", "OK")],
                );
                let l = h2load(dir.path(), svc.addr, LOGIN_PATH, &login_body, c, m, n).await?;
                let ok = metric(
                    &svc.metrics().await?,
                    "bitbucket_connector_rpc_requests_total",
                    &[("method", "LoginURL"), ("code", "OK")],
                ) - ok0;
                if h.succeeded != n as u64 || ok as usize != n {
                    return Err(format!(
                        "not every request succeeded: health {}/{n}, LoginURL OK {ok}/{n}",
                        h.succeeded
                    )
                    .into());
                }
                let ratio = l.rps / h.rps;
                ratios.push(ratio);
                println!(
                "| {log_level} | {c}×{m} | {round} | {:.0} | {:.0} / {:.0} | {:.0} | {:.0} / {:.0} | {ok:.0} / {n} | {ratio:.3} |",
                h.rps, h.p50_us, h.p99_us, l.rps, l.p50_us, l.p99_us
            );
            }
            let r = sorted(ratios);
            summary.push(format!(
                "{log_level} {c}×{m}: median ratio {:.3}",
                pct(&r, 50.0)
            ));
        }
        svc.stop().await?;
    }
    println!("\n{}", summary.join("; "));
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. cpu

async fn cpu() -> Res<()> {
    const CONCURRENCY: usize = 16;
    let fake = FakeBitbucket::start(bench_fixture()).await?;
    println!(
        "L = 0, {CONCURRENCY} logins at a time over 4 connections. Service CPU = utime+stime of \
         its process (clock tick {} Hz); bench CPU = this process (fake + clients).\n",
        clock_ticks()
    );
    println!(
        "| run | logins (OK) | wall s | logins/s | upstream calls/login | service CPU µs/login \
         (user + sys) | service CPU µs/upstream call | bench CPU µs/login |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    // (name, connector lines, log level, user, scopes, logins)
    type Run = (
        &'static str,
        Vec<String>,
        &'static str,
        &'static str,
        Option<pb::Scopes>,
        usize,
    );
    let runs: [Run; 3] = [
        (
            "plain: 1 workspace, no group options",
            vec![],
            "info",
            "bench-1",
            scopes(false, false),
            20_000,
        ),
        (
            "plain, logger.level warn (no per-RPC log line)",
            vec![],
            "warn",
            "bench-1",
            scopes(false, false),
            20_000,
        ),
        (
            "groups: 5 workspaces, groups + permissions, cache off",
            group_options("0s", false),
            "info",
            "bench-5",
            scopes(true, false),
            10_000,
        ),
    ];
    for (name, connector, log_level, user, sc, total) in runs {
        let svc = Svc::start(
            &fake,
            &SvcOpts {
                connector,
                log_level,
                ..Default::default()
            },
        )
        .await?;
        let channels = svc.channels(4).await?;
        login_many(&channels, &fake, user, sc, 500, CONCURRENCY).await;
        let (cpu0, me0, hits0, t0) = (
            proc_cpu(svc.pid),
            proc_cpu_secs(0),
            fake.total_hits(),
            Instant::now(),
        );
        let ok = login_many(&channels, &fake, user, sc, total, CONCURRENCY).await;
        let wall = t0.elapsed().as_secs_f64();
        let cpu1 = proc_cpu(svc.pid);
        let (user_s, sys_s) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
        let cpu = user_s + sys_s;
        let me = proc_cpu_secs(0) - me0;
        let calls = (fake.total_hits() - hits0) as f64;
        let per = |x: f64| x * 1e6 / total as f64;
        println!(
            "| {name} | {total} ({ok}) | {wall:.1} | {:.0} | {:.1} | {:.0} ({:.0} + {:.0}) | {:.1} | {:.0} |",
            total as f64 / wall,
            calls / total as f64,
            per(cpu),
            per(user_s),
            per(sys_s),
            cpu * 1e6 / calls,
            per(me),
        );
        svc.stop().await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 4. memory

async fn memory() -> Res<()> {
    const IN_FLIGHT: usize = 1000;
    const CONNECTIONS: usize = 10;
    const WAVES: usize = 3;
    let fake = FakeBitbucket::start(bench_fixture()).await?;
    let svc = Svc::start(
        &fake,
        &SvcOpts {
            grpc: vec!["maxInFlight: 2000".into()],
            ..Default::default()
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = svc.status_kb("VmRSS");
    let channels = svc.channels(CONNECTIONS).await?;
    fake.set_delay(Duration::from_millis(200));
    println!(
        "L = 200 ms, {IN_FLIGHT} HandleCallback at once (plain login, offline_access) over \
         {CONNECTIONS} HTTP/2 connections, {WAVES} waves; grpc.maxInFlight 2000.\n"
    );
    println!("idle VmRSS after startup: {:.1} MB\n", mb(idle));
    println!(
        "| wave | OK | max rpc_in_flight seen | max open fds | wave ms | VmRSS peak sampled MB | VmRSS after MB | VmHWM MB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for wave in 1..=WAVES {
        let t = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..IN_FLIGHT {
            let ch = channels[i % CONNECTIONS].clone();
            let fake = fake.clone();
            tasks.spawn(async move {
                login(&ch, &fake, "bench-1", scopes(false, true), None)
                    .await
                    .is_ok()
            });
        }
        let mut peak_rss = 0;
        let mut peak_fds = 0;
        let mut peak_inflight = 0.0f64;
        let sampler = async {
            loop {
                peak_rss = peak_rss.max(svc.status_kb("VmRSS"));
                peak_fds = peak_fds.max(open_fds(svc.pid));
                if let Ok(m) = svc.metrics().await {
                    peak_inflight =
                        peak_inflight.max(metric(&m, "bitbucket_connector_rpc_in_flight", &[]));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let mut ok = 0;
        tokio::select! {
            _ = sampler => {}
            _ = async {
                while let Some(r) = tasks.join_next().await {
                    ok += usize::from(r.unwrap_or(false));
                }
            } => {}
        }
        let ms = t.elapsed().as_millis();
        tokio::time::sleep(Duration::from_millis(300)).await;
        println!(
            "| {wave} | {ok} | {peak_inflight:.0} | {peak_fds} | {ms} | {:.1} | {:.1} | {:.1} |",
            mb(peak_rss),
            mb(svc.status_kb("VmRSS")),
            mb(svc.status_kb("VmHWM"))
        );
    }
    fake.set_delay(Duration::ZERO);
    svc.stop().await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 5. startup

async fn startup() -> Res<()> {
    const STARTS: usize = 20;
    let fake = FakeBitbucket::start(bench_fixture()).await?;
    let mut times = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..STARTS {
        let svc = Svc::start(&fake, &SvcOpts::default()).await?;
        times.push(svc.startup.as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        rss.push(svc.status_kb("VmRSS") as f64 / 1024.0);
        let status = svc.stop().await?;
        if !status.success() {
            return Err(format!("exit status {status}").into());
        }
    }
    let t = sorted(times);
    let r = sorted(rss);
    println!(
        "spawn → first Health/Check SERVING (fresh connection tried every ~1 ms), {STARTS} starts; \
         VmRSS 200 ms after SERVING.\n"
    );
    println!("| median ms | p90 ms | min ms | max ms | idle VmRSS median MB | max MB |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
        pct(&t, 50.0),
        pct(&t, 90.0),
        t[0],
        t[t.len() - 1],
        pct(&r, 50.0),
        r[r.len() - 1]
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 6. faults

#[derive(Default)]
struct Tally {
    by_outcome: BTreeMap<String, u64>,
    transport_msgs: BTreeMap<String, u64>,
}

impl Tally {
    fn add(&mut self, key: String) {
        *self.by_outcome.entry(key).or_default() += 1;
    }
}

async fn faults(duration: u64, clients: usize, scale: f64) -> Res<()> {
    const CONNECTIONS: usize = 20;
    const DEADLINE: Duration = Duration::from_secs(10);
    let fake = FakeBitbucket::start(bench_fixture()).await?;
    let svc = Svc::start(
        &fake,
        &SvcOpts {
            connector: group_options("0s", false),
            grpc: vec![format!("maxInFlight: {}", (clients * 2).max(1024))],
            upstream_timeout: "1s",
            ..Default::default()
        },
    )
    .await?;
    // A faulted request goes to any endpoint; the code exchange is never retried.
    fake.inject_random(Endpoint::Any, Fault::Status(503), 0.05 * scale);
    fake.inject_random(
        Endpoint::Any,
        Fault::Delay(Duration::from_millis(1500)),
        0.01 * scale,
    );
    fake.inject_random(Endpoint::Any, Fault::Garbage, 0.01 * scale);
    println!(
        "{clients} clients for {duration} s (fault scale {scale}), each logging in back to back (bench-5: 5 workspaces, \
         groups + permissions, group cache off) with a {}-s deadline, over {CONNECTIONS} \
         connections. The fake answers 5% of requests 503, delays 1% by 1.5 s \
         (upstreamTimeout 1s), and sends 1% garbage bodies, on any endpoint.\n",
        DEADLINE.as_secs()
    );
    let channels = svc.channels(CONNECTIONS).await?;
    let start_rss = svc.status_kb("VmRSS");
    let end = Instant::now() + Duration::from_secs(duration);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..clients {
        let ch = channels[i % CONNECTIONS].clone();
        let (fake, tally, sent) = (fake.clone(), tally.clone(), sent.clone());
        tasks.spawn(async move {
            while Instant::now() < end {
                sent.fetch_add(1, Ordering::Relaxed);
                let r = tokio::time::timeout(
                    DEADLINE + Duration::from_secs(5),
                    login(&ch, &fake, "bench-5", scopes(true, false), Some(DEADLINE)),
                )
                .await;
                let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                match r {
                    Err(_) => t.add("unanswered".into()),
                    Ok(Ok(_)) => t.add("OK".into()),
                    Ok(Err(s)) if s.get_details_error_info().is_some() => {
                        t.add(format!("{:?}", s.code()))
                    }
                    Ok(Err(s)) => {
                        t.add(format!("{:?} (no ErrorInfo: transport)", s.code()));
                        *t.transport_msgs
                            .entry(s.message().chars().take(120).collect())
                            .or_default() += 1;
                    }
                }
            }
        });
    }
    // Health every 100 ms on its own connection; RSS every 5 s.
    let health_ch = svc.channel().await?;
    let mut health_counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut rss_series = vec![(0u64, start_rss, open_fds(svc.pid))];
    let t0 = Instant::now();
    let mut next_rss = 5;
    while Instant::now() < end {
        let k = match health(&health_ch, Duration::from_secs(2)).await {
            Ok(1) => "SERVING".to_string(),
            Ok(2) => "NOT_SERVING".to_string(),
            Ok(s) => format!("status {s}"),
            Err(e) => format!("error {:?}", e.code()),
        };
        *health_counts.entry(k).or_default() += 1;
        if t0.elapsed().as_secs() >= next_rss {
            rss_series.push((next_rss, svc.status_kb("VmRSS"), open_fds(svc.pid)));
            next_rss += 5;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drain = Instant::now();
    while tasks.join_next().await.is_some() {}
    let drained_ms = drain.elapsed().as_millis();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let end_rss = svc.status_kb("VmRSS");
    rss_series.push((t0.elapsed().as_secs(), end_rss, open_fds(svc.pid)));
    let metrics = svc.metrics().await?;
    let retries = metric(&metrics, "bitbucket_connector_upstream_retries_total", &[]);
    let stderr = svc.stderr_text();
    let panics = stderr.matches("panicked").count();
    let status = svc.stop().await?;

    let sent = sent.load(Ordering::Relaxed);
    let tally = std::mem::take(&mut *tally.lock().unwrap_or_else(|e| e.into_inner()));
    let answered: u64 = tally
        .by_outcome
        .iter()
        .filter(|(k, _)| *k != "unanswered")
        .map(|(_, v)| v)
        .sum();
    println!("| figure | value |\n|---|---|");
    println!("| requests sent | {sent} |");
    println!("| answered (any status) | {answered} |");
    for (k, v) in &tally.by_outcome {
        println!(
            "| {k} | {v} ({:.2}%) |",
            *v as f64 * 100.0 / sent.max(1) as f64
        );
    }
    if !tally.by_outcome.contains_key("unanswered") {
        println!("| unanswered | 0 |");
    }
    println!("| logins/s | {:.0} |", sent as f64 / duration as f64);
    println!("| upstream requests (fake) | {} |", fake.total_hits());
    println!("| upstream retries (service) | {retries:.0} |");
    println!("| panics in the service's stderr | {panics} |");
    println!("| health checks | {health_counts:?} |");
    println!(
        "| VmRSS MB (open fds) at t=s | {} |",
        rss_series
            .iter()
            .map(|(t, kb, fds)| format!("{t}: {:.1} ({fds})", mb(*kb)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("| last calls finished after the end | {drained_ms} ms |");
    println!("| exit status after SIGTERM | {status} |");
    for (m, n) in &tally.transport_msgs {
        println!("\ntransport error ×{n}: {m}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 7. shutdown

async fn shutdown() -> Res<()> {
    const IN_FLIGHT: usize = 200;
    let fake = FakeBitbucket::start(bench_fixture()).await?;
    let svc = Svc::start(&fake, &SvcOpts::default()).await?;
    let channels = svc.channels(4).await?;
    let probe = svc.channel().await?;
    fake.set_delay(Duration::from_millis(500));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..IN_FLIGHT {
        let ch = channels[i % channels.len()].clone();
        let fake = fake.clone();
        tasks.spawn(async move {
            let t = Instant::now();
            let r = login(&ch, &fake, "bench-1", scopes(false, true), None).await;
            (r, t.elapsed())
        });
    }
    // Every call is in flight once the gauge says so.
    let waited = Instant::now();
    loop {
        let m = svc.metrics().await?;
        if metric(&m, "bitbucket_connector_rpc_in_flight", &[]) as usize >= IN_FLIGHT
            || waited.elapsed() > Duration::from_secs(5)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sigterm_at = Instant::now();
    svc.sigterm()?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let health_during = match health(&probe, Duration::from_secs(1)).await {
        Ok(1) => "SERVING".to_string(),
        Ok(2) => "NOT_SERVING".to_string(),
        Ok(s) => format!("{s}"),
        Err(e) => format!("error {:?}", e.code()),
    };
    let late = login(&probe, &fake, "bench-1", scopes(false, true), None).await;
    let late = match late {
        Ok(_) => "OK".to_string(),
        Err(s) => format!(
            "{:?}{}",
            s.code(),
            if s.get_details_error_info().is_some() {
                ""
            } else {
                " (transport)"
            }
        ),
    };
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut slowest = Duration::ZERO;
    while let Some(r) = tasks.join_next().await {
        let (r, took) = r?;
        slowest = slowest.max(took);
        let k = match r {
            Ok(_) => "OK".to_string(),
            Err(s) if s.get_details_error_info().is_some() => format!("{:?}", s.code()),
            Err(s) => format!("{:?} cut (no ErrorInfo): {}", s.code(), s.message()),
        };
        *outcomes.entry(k).or_default() += 1;
    }
    let mut child = svc.child;
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await??;
    let exited_ms = sigterm_at.elapsed().as_millis();
    fake.set_delay(Duration::ZERO);
    println!(
        "L = 500 ms (a plain login is 2 round trips: ~1 s), {IN_FLIGHT} HandleCallback in \
         flight over 4 connections, then SIGTERM.\n"
    );
    println!("| figure | value |\n|---|---|");
    println!("| in-flight calls' outcomes | {outcomes:?} |");
    println!("| slowest in-flight call | {} ms |", slowest.as_millis());
    println!("| health 100 ms after SIGTERM (open connection) | {health_during} |");
    println!("| a new login 100 ms after SIGTERM (open connection) | {late} |");
    println!("| exit status | {status} |");
    println!("| SIGTERM → exit | {exited_ms} ms |");
    Ok(())
}

// ---------------------------------------------------------------------------
// 8. profile (callgrind)

/// `callgrind_annotate` rows: (percent, function), the binary's path dropped.
fn annotate_rows(text: &str) -> impl Iterator<Item = (f64, String)> + '_ {
    text.lines().filter_map(|l| {
        let (left, name) = l.split_once("%)")?;
        let pct: f64 = left.rsplit_once('(')?.1.trim().parse().ok()?;
        let name = name.trim();
        if name.contains("PROGRAM TOTALS") {
            return None;
        }
        let name = name.strip_prefix("???:").unwrap_or(name);
        let name = match name.rsplit_once(" [") {
            Some((n, _)) => n,
            None => name,
        };
        Some((pct, name.chars().take(160).collect()))
    })
}

/// `callgrind_control FLAG PID` (`-z` zeroes the counters, `-d` dumps them).
async fn callgrind_control(
    flag: &str,
    pid: u32,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let out = Command::new("callgrind_control")
        .args([flag, &pid.to_string()])
        .output()
        .await?;
    if !out.status.success() {
        return Err(format!(
            "callgrind_control {flag}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}

async fn profile() -> Res<()> {
    const LOGINS: usize = 2000;
    let fake = FakeBitbucket::start(bench_fixture()).await?;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("callgrind.out");
    let svc = Svc::start(
        &fake,
        &SvcOpts {
            wrapper: vec![
                "valgrind".into(),
                "--tool=callgrind".into(),
                format!("--callgrind-out-file={}", out.display()),
            ],
            ready_timeout: Duration::from_secs(60),
            ..Default::default()
        },
    )
    .await?;
    let channels = svc.channels(2).await?;
    login_many(&channels, &fake, "bench-1", scopes(false, false), 100, 4).await;
    // Count only the measured logins: zero the counters now.
    callgrind_control("-z", svc.pid).await?;
    let hits0 = fake.total_hits();
    let t = Instant::now();
    let ok = login_many(&channels, &fake, "bench-1", scopes(false, false), LOGINS, 4).await;
    let wall = t.elapsed().as_secs_f64();
    let calls = fake.total_hits() - hits0;
    callgrind_control("-d", svc.pid).await?;
    drop(channels);
    svc.stop().await?;
    // The dump is callgrind.out.1 (from -d); the exit dump is the other.
    let dump = std::fs::read_dir(dir.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("callgrind.out") && n.ends_with(".1"))
        })
        .ok_or("no callgrind dump")?;
    let ann = Command::new("callgrind_annotate")
        .args(["--inclusive=yes", "--threshold=99"])
        .arg(&dump)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&ann.stdout);
    let total: f64 = text
        .lines()
        .find(|l| l.contains("PROGRAM TOTALS"))
        .and_then(|l| l.split_whitespace().next()?.replace(',', "").parse().ok())
        .unwrap_or(f64::NAN);
    println!(
        "callgrind on the release binary, {LOGINS} plain logins (L = 0, 4 at a time) after 100 \
         warm-up logins; {ok} OK in {wall:.1} s under valgrind; {calls} upstream calls.\n"
    );
    println!(
        "instructions: {:.0} per login, {:.0} per upstream call\n",
        total / LOGINS as f64,
        total / calls as f64
    );
    let exclusive = Command::new("callgrind_annotate")
        .args(["--inclusive=no", "--threshold=100"])
        .arg(&dump)
        .output()
        .await?;
    let exclusive = String::from_utf8_lossy(&exclusive.stdout);
    println!(
        "Top functions by inclusive instructions (% of all; the runtime's own frames above 95% \
         left out):\n"
    );
    println!("```");
    for (pct, name) in annotate_rows(&text).filter(|(p, _)| *p < 95.0).take(45) {
        println!("{pct:5.1}%  {name}");
    }
    println!("```\n\nTop functions by exclusive (self) instructions:\n");
    println!("```");
    for (pct, name) in annotate_rows(&exclusive)
        .filter(|(p, _)| *p < 95.0)
        .take(25)
    {
        println!("{pct:5.1}%  {name}");
    }
    println!("```");
    let keep = std::env::var_os("BENCH_KEEP_PROFILE").map(PathBuf::from);
    if let Some(k) = keep {
        std::fs::copy(&dump, &k)?;
        println!("\ncallgrind output kept at {}", k.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 7. attacks (opt-in): what a hostile or broken caller costs

/// What one attack did to the process.
struct AttackRow {
    attack: String,
    before_kb: u64,
    peak_kb: u64,
    after_kb: u64,
    cpu_pct: f64,
    /// Health/Check latency on a connection opened before the attack.
    health_open: String,
    /// Health/Check on a new connection during the attack.
    health_new: String,
    note: String,
}

impl AttackRow {
    fn print(&self) {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.0} | {} | {} | {} |",
            self.attack,
            mb(self.before_kb),
            mb(self.peak_kb),
            mb(self.after_kb),
            self.cpu_pct,
            self.health_open,
            self.health_new,
            self.note
        );
    }
}

async fn timed_health(ch: &Channel) -> String {
    let t = Instant::now();
    match health(ch, Duration::from_secs(2)).await {
        Ok(1) => format!("{:.1} ms", t.elapsed().as_secs_f64() * 1000.0),
        Ok(s) => format!("status {s}"),
        Err(e) => format!("{:?} after {:.1} s", e.code(), t.elapsed().as_secs_f64()),
    }
}

async fn timed_health_new(addr: SocketAddr) -> String {
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(2), async {
        let ch = Channel::from_shared(format!("http://{addr}"))
            .ok()?
            .connect()
            .await
            .ok()?;
        health(&ch, Duration::from_secs(2)).await.ok()
    })
    .await;
    match r {
        Ok(Some(1)) => format!("{:.1} ms", t.elapsed().as_secs_f64() * 1000.0),
        _ => format!("no answer in {:.1} s", t.elapsed().as_secs_f64()),
    }
}

/// Samples the process for `secs` while an attack holds: peak VmRSS, CPU
/// share of one core, and health on an open and on a new connection.
async fn observe(svc: &Svc, open: &Channel, secs: u64) -> (u64, f64, String, String) {
    let cpu0 = proc_cpu_secs(svc.pid);
    let t0 = Instant::now();
    let mut peak = 0;
    while t0.elapsed() < Duration::from_secs(secs) {
        peak = peak.max(svc.status_kb("VmRSS"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cpu = (proc_cpu_secs(svc.pid) - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let health_open = timed_health(open).await;
    let health_new = timed_health_new(svc.addr).await;
    (
        peak.max(svc.status_kb("VmRSS")),
        cpu,
        health_open,
        health_new,
    )
}

async fn after_15s(svc: &Svc) -> u64 {
    tokio::time::sleep(Duration::from_secs(15)).await;
    svc.status_kb("VmRSS")
}

async fn attacks() -> Res<()> {
    println!(
        "Each attack against a fresh process with the default config unless said; \
         \"during\" is the peak VmRSS sampled every 100 ms while the attack holds, \
         \"after\" 15 s after the attacker closed its connections; CPU is the \
         service's share of one core during the hold; health is Health/Check on a \
         connection opened before the attack, and on a new one (2 s limit).\n"
    );
    println!(
        "| attack | VmRSS before MB | during MB | 15 s after MB | CPU % | health, open connection | health, new connection | notes |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let fake = FakeBitbucket::start(bench_fixture()).await?;
    attack_held_streams(&fake, 100, 1024).await?.print();
    attack_idle_connections(&fake, 2000).await?.print();
    attack_descriptors(&fake, 1000).await?.print();
    attack_big_bodies(&fake, 200).await?.print();
    Ok(())
}

/// `conns` HTTP/2 connections, each opening up to `streams` LoginURL streams
/// that send HEADERS and never a body, held 10 s.
async fn attack_held_streams(fake: &FakeBitbucket, conns: usize, streams: usize) -> Res<AttackRow> {
    let svc = Svc::start(fake, &SvcOpts::default()).await?;
    let open = svc.channel().await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before_kb = svc.status_kb("VmRSS");
    let opened = Arc::new(AtomicU64::new(0));
    let mut held = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let addr = svc.addr;
        let opened = opened.clone();
        held.spawn(async move {
            let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
                return;
            };
            let Ok((send, conn)) = h2::client::handshake(tcp).await else {
                return;
            };
            let driver = tokio::spawn(conn);
            let mut send = send;
            let mut keep = Vec::new();
            for _ in 0..streams {
                // Up to the server's SETTINGS_MAX_CONCURRENT_STREAMS.
                match tokio::time::timeout(Duration::from_millis(200), send.clone().ready()).await {
                    Ok(Ok(s)) => send = s,
                    _ => break,
                }
                let req = http::Request::post(format!(
                    "http://{addr}/connector.v1.ConnectorService/LoginURL"
                ))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .expect("request");
                match send.send_request(req, false) {
                    Ok(s) => {
                        opened.fetch_add(1, Ordering::Relaxed);
                        keep.push(s)
                    }
                    Err(_) => break,
                }
            }
            std::future::pending::<()>().await;
            drop((keep, driver));
        });
    }
    let (peak_kb, cpu_pct, health_open, health_new) = observe(&svc, &open, 10).await;
    let in_flight = metric(
        &svc.metrics().await?,
        "bitbucket_connector_rpc_in_flight",
        &[],
    );
    held.abort_all();
    while held.join_next().await.is_some() {}
    let after_kb = after_15s(&svc).await;
    let row = AttackRow {
        attack: format!("held streams: {conns} connections × up to {streams} bodyless streams"),
        before_kb,
        peak_kb,
        after_kb,
        cpu_pct,
        health_open,
        health_new,
        note: format!(
            "{} streams opened; rpc_in_flight {in_flight:.0} during",
            opened.load(Ordering::Relaxed)
        ),
    };
    svc.stop().await?;
    Ok(row)
}

/// `n` TCP connections that never send a byte; connectionIdleTimeout 20s
/// (left out with `BENCH_ATTACKS_OLD_CONFIG=1`, for a binary without the key).
async fn attack_idle_connections(fake: &FakeBitbucket, n: usize) -> Res<AttackRow> {
    let old = std::env::var_os("BENCH_ATTACKS_OLD_CONFIG").is_some();
    let grpc = if old {
        Vec::new()
    } else {
        vec!["connectionIdleTimeout: 20s".into()]
    };
    let svc = Svc::start(
        fake,
        &SvcOpts {
            grpc,
            ..Default::default()
        },
    )
    .await?;
    let open = svc.channel().await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before_kb = svc.status_kb("VmRSS");
    let fds_before = open_fds(svc.pid);
    let mut silent = Vec::new();
    for _ in 0..n {
        // Beyond maxConnections and the listen backlog a connect hangs.
        let c = tokio::net::TcpStream::connect(svc.addr);
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(200), c).await {
            silent.push(s);
        }
    }
    let (peak_kb, cpu_pct, health_open, health_new) = observe(&svc, &open, 5).await;
    let held = open_fds(svc.pid).saturating_sub(fds_before);
    // When the service lets them go (it keeps `open`, which is busy with health).
    let t = Instant::now();
    let mut released = None;
    while t.elapsed() < Duration::from_secs(60) {
        if open_fds(svc.pid) <= fds_before + 2 {
            released = Some(t.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = health(&open, Duration::from_secs(1)).await;
    }
    let connected = silent.len();
    drop(silent);
    let after_kb = after_15s(&svc).await;
    let row = AttackRow {
        attack: format!("idle connections: {n} silent TCP connections (connectionIdleTimeout 20s)"),
        before_kb,
        peak_kb,
        after_kb,
        cpu_pct,
        health_open,
        health_new,
        note: format!(
            "{connected} connected, {held} held by the service 5 s in; all closed by it {}",
            released.map_or("not within 60 s".to_string(), |d| format!(
                "{:.0} s after the last one came",
                d.as_secs_f64() + 5.0
            ))
        ),
    };
    svc.stop().await?;
    Ok(row)
}

/// The service under `ulimit -n 256`, `n` connections opened at it.
async fn attack_descriptors(fake: &FakeBitbucket, n: usize) -> Res<AttackRow> {
    let svc = Svc::start(
        fake,
        &SvcOpts {
            wrapper: vec![
                "sh".into(),
                "-c".into(),
                "ulimit -n 256 && exec \"$0\" \"$@\"".into(),
            ],
            ..Default::default()
        },
    )
    .await?;
    let open = svc.channel().await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before_kb = svc.status_kb("VmRSS");
    let mut hogs = Vec::new();
    for _ in 0..n {
        let c = tokio::net::TcpStream::connect(svc.addr);
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(200), c).await {
            hogs.push(s);
        }
    }
    let (peak_kb, cpu_pct, health_open, health_new) = observe(&svc, &open, 5).await;
    let fds = open_fds(svc.pid);
    drop(hogs);
    let after_kb = after_15s(&svc).await;
    let log = svc.stderr_text();
    let row = AttackRow {
        attack: format!("descriptor exhaustion: ulimit -n 256, {n} connections"),
        before_kb,
        peak_kb,
        after_kb,
        cpu_pct,
        health_open,
        health_new: format!("{health_new}; after: {}", timed_health_new(svc.addr).await),
        note: format!(
            "{fds} fds open; {} accept-failure log lines",
            log.matches("accept failed").count()
        ),
    };
    svc.stop().await?;
    Ok(row)
}

/// `n` logins at once whose `/2.0/user` answer is just under the 4 MiB body cap.
async fn attack_big_bodies(fake: &FakeBitbucket, n: usize) -> Res<AttackRow> {
    let svc = Svc::start(fake, &SvcOpts::default()).await?;
    let open = svc.channel().await?;
    let channels = svc.channels(10).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before_kb = svc.status_kb("VmRSS");
    fake.inject(
        Endpoint::User,
        Fault::HugeBody(4 * 1024 * 1024 - 1024),
        None,
    );
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let ch = channels[i % channels.len()].clone();
        let fake = fake.clone();
        tasks.spawn(async move { login(&ch, &fake, "bench-1", scopes(false, false), None).await });
    }
    let sampling = observe(&svc, &open, 3);
    let ((peak_kb, cpu_pct, health_open, health_new), outcomes) = tokio::join!(sampling, async {
        let mut codes = BTreeMap::<String, u64>::new();
        while let Some(r) = tasks.join_next().await {
            let k = match r {
                Ok(Ok(_)) => "OK".to_string(),
                Ok(Err(e)) => format!("{:?}", e.code()),
                Err(_) => "panic".to_string(),
            };
            *codes.entry(k).or_default() += 1;
        }
        codes
    });
    fake.clear_faults();
    drop(channels);
    let after_kb = after_15s(&svc).await;
    let row = AttackRow {
        attack: format!("big upstream bodies: {n} logins at once, /2.0/user 4 MiB − 1 KiB"),
        before_kb,
        peak_kb,
        after_kb,
        cpu_pct,
        health_open,
        health_new,
        note: format!("outcomes {outcomes:?}"),
    };
    svc.stop().await?;
    Ok(row)
}
