//! Bitbucket's rate budget: upstream calls per login and per refresh
//! (`budget`), and an organisation's working day against 1,000 requests per
//! hour per resource (`org`). Every call figure is counted at the fake, per
//! endpoint (Bitbucket's resource); what is computed instead is said so.

use super::*;

/// Workspaces of the budget world.
const ORG_WORKSPACES: usize = 100;
/// The organisation: users and their workspace counts, 1..=50 skewed.
const ORG_USERS: usize = 500;
const ORG_MAX_W: usize = 50;
/// A working day: one login, then a refresh every 30 minutes for 8 hours.
const REFRESHES_PER_DAY: usize = 16;
const HOUR_BUDGET: f64 = 1000.0;

/// The resources Bitbucket counts separately, as the fake counts them.
const RESOURCES: &[(Endpoint, &str)] = &[
    (Endpoint::Token, "token"),
    (Endpoint::User, "user"),
    (Endpoint::Emails, "emails"),
    (Endpoint::Workspaces, "workspaces"),
    (Endpoint::Permission, "permission"),
    (Endpoint::Groups, "groups list"),
    (Endpoint::GroupFilter, "groups?group="),
];

fn org_slug(w: usize) -> String {
    format!("org-{w:03}")
}

fn org_uuid(i: usize) -> String {
    format!("{{d0000000-0000-4000-8000-{i:012}}}")
}

fn org_user(i: usize) -> String {
    format!("org-user-{i}")
}

/// Plain members (no admin anywhere) in exactly W workspaces, for the
/// per-login table.
fn member_user(w: usize) -> String {
    format!("member-{w}")
}

/// User i's workspace count: 1 + 49·(i/500)³, so most users are in a few
/// workspaces and a tail in up to 50 (mean ≈ 13).
fn org_w(i: usize) -> usize {
    let x = i as f64 / ORG_USERS as f64;
    1 + ((ORG_MAX_W - 1) as f64 * x * x * x).round() as usize
}

/// Whether org user i administers workspace w (about 1 in 25 memberships).
fn org_admin(i: usize, w: usize) -> bool {
    (i + 7 * w) % 25 == 0
}

/// 100 workspaces with groups `developers` (every member), `ops` (every
/// fifth member) and `leads` (none); the org users; members-only users
/// `member-{1,20,100}`; an admin credential for every workspace.
fn org_fixture() -> Fixture {
    let mut f = Fixture::demo();
    let email = |name: &str| Email {
        email: format!("{name}@example.com"),
        is_primary: true,
        is_confirmed: true,
    };
    let user = |uuid: String, name: String| User {
        uuid,
        username: Some(name.clone()),
        nickname: name.clone(),
        display_name: name.clone(),
        account_id: format!("712020:{name}"),
        emails: vec![email(&name)],
    };
    let mut members: Vec<Vec<(String, bool)>> = vec![Vec::new(); ORG_WORKSPACES];
    for i in 0..ORG_USERS {
        f.users.push(user(org_uuid(i), org_user(i)));
        for (w, m) in members.iter_mut().enumerate().take(org_w(i)) {
            m.push((org_uuid(i), org_admin(i, w)));
        }
    }
    for &w in &[1usize, 20, 100] {
        let uuid = format!("{{e0000000-0000-4000-8000-{w:012}}}");
        f.users.push(user(uuid.clone(), member_user(w)));
        for m in members.iter_mut().take(w) {
            m.push((uuid.clone(), false));
        }
    }
    for (w, m) in members.into_iter().enumerate() {
        let all: Vec<String> = m.iter().map(|(u, _)| u.clone()).collect();
        f.workspaces.push(Workspace {
            slug: org_slug(w),
            uuid: format!("{{f0000000-0000-4000-8000-{w:012}}}"),
            name: format!("Org {w}"),
            members: m
                .iter()
                .map(|(u, admin)| Membership {
                    user_uuid: u.clone(),
                    permission: if *admin { "owner" } else { "member" }.into(),
                })
                .collect(),
            groups: vec![
                Group {
                    slug: "developers".into(),
                    name: "Developers".into(),
                    members: all.clone(),
                },
                Group {
                    slug: "ops".into(),
                    name: "Ops".into(),
                    members: all.iter().step_by(5).cloned().collect(),
                },
                Group {
                    slug: "leads".into(),
                    name: "Leads".into(),
                    members: vec![],
                },
            ],
        });
    }
    f.admins.push(AdminCredential {
        username: BENCH_ADMIN.into(),
        password: BENCH_ADMIN_PASSWORD.into(),
        workspaces: (0..ORG_WORKSPACES).map(org_slug).collect(),
    });
    f
}

/// The two ways to groups: workspace group lists read with an admin
/// credential (includeTeamGroups + teamGroupsAuth), or membership checks
/// with the user's own token (teamGroups); getWorkspacePermissions with both.
#[derive(Clone, Copy, PartialEq)]
enum Groups {
    Lists,
    TeamGroups,
}

impl Groups {
    fn name(self) -> &'static str {
        match self {
            Groups::Lists => "lists (teamGroupsAuth)",
            Groups::TeamGroups => "teamGroups",
        }
    }

    fn config(self, ttls: &Ttls) -> Vec<String> {
        let mut v = vec![
            "getWorkspacePermissions: true".to_string(),
            format!("permissionCacheTTL: {}", ttls.permission),
            format!("teamGroupsCacheTTL: {}", ttls.groups),
            format!("refreshCacheTTL: {}", ttls.refresh),
        ];
        match self {
            Groups::Lists => v.extend([
                "includeTeamGroups: true".to_string(),
                "teamGroupsAuth:".to_string(),
                format!("  username: {BENCH_ADMIN}"),
                format!("  password: {BENCH_ADMIN_PASSWORD}"),
            ]),
            Groups::TeamGroups => {
                let list: Vec<String> = (0..ORG_WORKSPACES)
                    .flat_map(|w| {
                        [
                            format!("{}/developers", org_slug(w)),
                            format!("{}/ops", org_slug(w)),
                        ]
                    })
                    .collect();
                v.push(format!("teamGroups: [{}]", list.join(", ")));
            }
        }
        v
    }
}

struct Ttls {
    permission: String,
    groups: String,
    refresh: String,
}

fn snapshot(fake: &FakeBitbucket) -> Vec<u64> {
    RESOURCES.iter().map(|(e, _)| fake.hits(*e)).collect()
}

fn delta(fake: &FakeBitbucket, before: &[u64]) -> Vec<u64> {
    snapshot(fake)
        .iter()
        .zip(before)
        .map(|(a, b)| a - b)
        .collect()
}

/// `resource:n` for the non-zero ones, and the total.
fn by_resource(d: &[u64]) -> (String, u64) {
    let parts: Vec<String> = RESOURCES
        .iter()
        .zip(d)
        .filter(|(_, n)| **n > 0)
        .map(|((_, name), n)| format!("{name} {n}"))
        .collect();
    (parts.join(", "), d.iter().sum())
}

async fn refresh(ch: &Channel, identity: pb::Identity) -> Result<pb::Identity, tonic::Status> {
    ConnectorServiceClient::new(ch.clone())
        .refresh(pb::RefreshRequest {
            scopes: scopes(true, true),
            identity: Some(identity),
            connector_id: String::new(),
        })
        .await
        .map(|r| r.into_inner().identity.unwrap_or_default())
}

/// dex's bitbucket-cloud connector per login: token, user, emails,
/// ⌈W/10⌉ workspace pages, W permission calls (issue 12's measured pattern).
fn dex_login(w: usize) -> usize {
    3 + w.div_ceil(10) + w
}

// ---------------------------------------------------------------------------
// budget

pub async fn calls() -> Res<()> {
    let fake = FakeBitbucket::start(org_fixture()).await?;
    println!(
        "Upstream calls per login and per refresh, counted at the fake by resource; users \
         `member-W` are plain members (no admin) of W workspaces, every workspace with 3 groups \
         (the user in 1 or 2 of them); getWorkspacePermissions and scopes.groups always. Cold: \
         a fresh service process; warm: the same user again at once (caches within their TTLs: \
         permissionCacheTTL 10m, teamGroupsCacheTTL 60s). Refresh: right after the warm login, \
         access token still valid. dex: 3 + ⌈W/10⌉ + W per login (computed from its pattern), \
         and no `ws/group` entries.\n"
    );
    println!("| groups | W | call | calls | by resource | dex |");
    println!("|---|---|---|---|---|---|");
    for groups in [Groups::Lists, Groups::TeamGroups] {
        for refresh_ttl in ["0s", "30m"] {
            let ttls = Ttls {
                permission: "10m".into(),
                groups: "60s".into(),
                refresh: refresh_ttl.into(),
            };
            for w in [1usize, 20, 100] {
                // A fresh process per row: nothing cached from another user.
                let svc = Svc::start(
                    &fake,
                    &SvcOpts {
                        connector: groups.config(&ttls),
                        ..Default::default()
                    },
                )
                .await?;
                let ch = svc.channel().await?;
                let user = member_user(w);
                let mut rows: Vec<(String, Vec<u64>)> = Vec::new();
                let before = snapshot(&fake);
                let cold = login(&ch, &fake, &user, scopes(true, true), None).await?;
                if cold.groups.len() < 2 * w {
                    return Err(format!("{user}: {} groups", cold.groups.len()).into());
                }
                if refresh_ttl == "0s" {
                    rows.push(("login, cold".into(), delta(&fake, &before)));
                }
                let before = snapshot(&fake);
                let warm = login(&ch, &fake, &user, scopes(true, true), None).await?;
                if warm.groups != cold.groups {
                    return Err(format!("{user}: warm login changed the groups").into());
                }
                if refresh_ttl == "0s" {
                    rows.push(("login, warm".into(), delta(&fake, &before)));
                }
                let before = snapshot(&fake);
                let r = refresh(&ch, warm).await?;
                if r.groups != cold.groups {
                    return Err(format!("{user}: refresh changed the groups").into());
                }
                rows.push((
                    format!("refresh, refreshCacheTTL {refresh_ttl}"),
                    delta(&fake, &before),
                ));
                for (what, d) in rows {
                    let (parts, total) = by_resource(&d);
                    let dex = if what.starts_with("login") {
                        dex_login(w).to_string()
                    } else {
                        (dex_login(w) - 1).to_string()
                    };
                    println!(
                        "| {} | {w} | {what} | {total} | {parts} | {dex} |",
                        groups.name()
                    );
                }
                svc.stop().await?;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// org

/// A redis-server of the bench's own on a free loopback port.
struct Redis {
    child: std::process::Child,
    port: u16,
}

impl Redis {
    async fn start() -> Res<Redis> {
        let port = free_port()?.port();
        let mut child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server ({e}): run scripts/install-test-deps"))?;
        for _ in 0..250 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(Redis { child, port });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        Err("redis-server did not listen".into())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Simulated time runs `speedup` times faster than real time; TTLs and
/// intervals are scaled alike.
fn scaled(sim: Duration, speedup: f64) -> Duration {
    sim.div_f64(speedup)
}

fn go_ms(sim: Duration, speedup: f64) -> String {
    format!("{}ms", scaled(sim, speedup).as_millis().max(1))
}

/// One organisation day: each user logs in at a random time in the first
/// hour, then refreshes every 30 minutes, 16 times; each RPC goes to replica
/// (user + n) mod R (a load balancer without affinity). Returns the calls
/// per resource and the RPCs that failed.
async fn day(
    fake: &FakeBitbucket,
    groups: Groups,
    replicas: usize,
    redis: Option<&Redis>,
    refresh_ttl: Duration,
    permission_ttl: Duration,
    speedup: f64,
) -> Res<(Vec<u64>, usize, Duration)> {
    let ttls = Ttls {
        permission: go_ms(permission_ttl, speedup),
        groups: go_ms(Duration::from_secs(60), speedup),
        refresh: if refresh_ttl.is_zero() {
            "0s".into()
        } else {
            go_ms(refresh_ttl, speedup)
        },
    };
    let top = redis
        .map(|r| {
            vec![
                "cache:".to_string(),
                "  redis:".to_string(),
                format!("    url: redis://127.0.0.1:{}/0", r.port),
            ]
        })
        .unwrap_or_default();
    if let Some(r) = redis {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/0", r.port))?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("FLUSHALL").query_async::<()>(&mut conn).await?;
    }
    let mut svcs = Vec::new();
    for _ in 0..replicas {
        svcs.push(
            Svc::start(
                fake,
                &SvcOpts {
                    top: top.clone(),
                    connector: groups.config(&ttls),
                    log_level: "warn",
                    ..Default::default()
                },
            )
            .await?,
        );
    }
    let mut channels = Vec::new();
    for s in &svcs {
        channels.push(s.channel().await?);
    }
    let before = snapshot(fake);
    let failed = Arc::new(AtomicU64::new(0));
    // How late (real ms) an RPC went out against its schedule, at worst.
    let lag = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut rng_state: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..ORG_USERS {
        // xorshift: the same login times every run.
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        let login_at = Duration::from_secs(rng_state % 3600);
        let channels = channels.clone();
        let fake = fake.clone();
        let failed = failed.clone();
        let lag = lag.clone();
        tasks.spawn(async move {
            let due = start + scaled(login_at, speedup);
            tokio::time::sleep_until(due.into()).await;
            lag.fetch_max(due.elapsed().as_millis() as u64, Ordering::Relaxed);
            let ch = &channels[i % channels.len()];
            let Ok(mut identity) = login(ch, &fake, &org_user(i), scopes(true, true), None).await
            else {
                failed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            for n in 1..=REFRESHES_PER_DAY {
                let at = login_at + Duration::from_secs(1800 * n as u64);
                let due = start + scaled(at, speedup);
                tokio::time::sleep_until(due.into()).await;
                lag.fetch_max(due.elapsed().as_millis() as u64, Ordering::Relaxed);
                let ch = &channels[(i + n) % channels.len()];
                match refresh(ch, identity.clone()).await {
                    Ok(next) => identity = next,
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let d = delta(fake, &before);
    for s in svcs {
        s.stop().await?;
    }
    let lag = Duration::from_millis(lag.load(Ordering::Relaxed));
    Ok((d, failed.load(Ordering::Relaxed) as usize, lag))
}

/// `permission_ttl`: 10m (the README's example) for `org`, a working day
/// (8h) for `org-day`: a refresh every 30 minutes outlives a 10m cache.
pub async fn organisation(permission_ttl: Duration, speedup: f64) -> Res<()> {
    let fake = FakeBitbucket::start(org_fixture()).await?;
    let redis = Redis::start().await?;
    let mean_w = (0..ORG_USERS).map(org_w).sum::<usize>() as f64 / ORG_USERS as f64;
    let per_day = 1 + REFRESHES_PER_DAY;
    println!(
        "An organisation's working day, measured: {ORG_USERS} users in 1..{ORG_MAX_W} workspaces \
         (1 + 49·(i/500)³; mean {mean_w:.1}; ~4 % of memberships admin), each logging in once at \
         a random time of the first hour, then refreshing every 30 min, {REFRESHES_PER_DAY} times \
         (scopes.groups, getWorkspacePermissions; permissionCacheTTL {}, teamGroupsCacheTTL 60s). \
         Simulated time runs {speedup}x faster, TTLs and intervals scaled alike; RPCs go round \
         robin over the replicas (no affinity). Calls are counted at the fake by resource, \
         per user-day (= per login with its day of refreshes). Access tokens do not expire \
         within the compressed run: a real day adds 4 redemptions per user (token resource, \
         computed, in the token column) and those 4 refreshes cannot use refreshCacheTTL. \
         Logins/hour = {HOUR_BUDGET} / the busiest resource's calls per user-day (steady state, \
         one login per user-day). dex: its pattern on the same population, computed: per login \
         3 + ⌈W/10⌉ + W, per refresh the same without the token call, and no `ws/group`.\n",
        humantime(permission_ttl)
    );
    let header: Vec<&str> = RESOURCES.iter().map(|(_, n)| *n).collect();
    println!(
        "| groups | replicas | cache | refreshCacheTTL | {} | busiest | logins/hour | vs dex | failed RPCs | worst lag (sim) |",
        header.join(" | ")
    );
    println!(
        "|---|---|---|---|{}---|---|---|---|---|",
        "---|".repeat(RESOURCES.len())
    );
    // dex, computed on the same population.
    let mut dex = vec![0f64; RESOURCES.len()];
    for i in 0..ORG_USERS {
        let w = org_w(i) as f64;
        let pages = org_w(i).div_ceil(10) as f64;
        dex[0] += 1.0 + 4.0;
        dex[1] += per_day as f64;
        dex[2] += per_day as f64;
        dex[3] += per_day as f64 * pages;
        dex[4] += per_day as f64 * w;
    }
    let dex: Vec<f64> = dex.iter().map(|c| c / ORG_USERS as f64).collect();
    let dex_busiest = dex.iter().cloned().fold(0.0, f64::max);
    let dex_rate = HOUR_BUDGET / dex_busiest;
    let cells = |v: &[f64]| {
        v.iter()
            .map(|c| format!("{c:.1}"))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    println!(
        "| dex (computed) | any | – | – | {} | {dex_busiest:.1} | {dex_rate:.0} | 1.0x | – | – |",
        cells(&dex)
    );
    let all: &[(Groups, usize, bool, u64)] = &[
        (Groups::Lists, 1, false, 0),
        (Groups::Lists, 3, false, 0),
        (Groups::Lists, 3, true, 0),
        (Groups::Lists, 3, true, 35 * 60),
        (Groups::TeamGroups, 1, false, 0),
        (Groups::TeamGroups, 3, false, 0),
        (Groups::TeamGroups, 3, true, 0),
        (Groups::TeamGroups, 3, true, 35 * 60),
    ];
    // A 10m permission cache misses on every 30-minute refresh: two rows show
    // it (each costs the fake many more requests).
    let short: &[(Groups, usize, bool, u64)] = &[all[0], all[6]];
    let runs = if permission_ttl < Duration::from_secs(1800) {
        short
    } else {
        all
    };
    for &(groups, replicas, shared, refresh_secs) in runs {
        let refresh_ttl = Duration::from_secs(refresh_secs);
        let (d, failed, lag) = day(
            &fake,
            groups,
            replicas,
            shared.then_some(&redis),
            refresh_ttl,
            permission_ttl,
            speedup,
        )
        .await?;
        let mut per: Vec<f64> = d.iter().map(|c| *c as f64 / ORG_USERS as f64).collect();
        // The 4 redemptions of a real day, computed.
        per[0] += 4.0;
        let busiest = per.iter().cloned().fold(0.0, f64::max);
        let rate = HOUR_BUDGET / busiest;
        println!(
            "| {} | {replicas} | {} | {} | {} | {busiest:.1} | {rate:.0} | {:.1}x | {failed} | {:.0} s |",
            groups.name(),
            if shared { "Redis" } else { "in-process" },
            if refresh_secs == 0 {
                "0s".to_string()
            } else {
                format!("{}m", refresh_secs / 60)
            },
            cells(&per),
            rate / dex_rate,
            (lag.as_secs_f64() * speedup),
        );
    }
    Ok(())
}

fn humantime(d: Duration) -> String {
    match d.as_secs() {
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s => format!("{}m", s / 60),
    }
}
