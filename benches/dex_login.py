"""Benchmark: the whole OIDC login through dex (authorize -> Bitbucket ->
dex's callback -> the client's redirect -> dex's /token), dex's built-in
`bitbucket-cloud` connector against dex + bitbucket-connector, in one run,
for a user in W whitelisted workspaces with getWorkspacePermissions, every
upstream request delayed by L at the fake. Prints Markdown.

    scripts/bench-dex [--workspaces 20] [--latency-ms 50] [--logins 7]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))

from dexenv import Stack  # noqa: E402


def measure(stack, latency_ms, logins):
    stack.fake.settings(delay_ms=latency_ms)
    rp = stack.rp()
    rp.login("wide")  # warm: connections, dex's keys, the service's caches as a second login finds them
    times, calls, browser = [], [], []
    for _ in range(logins):
        before = stack.fake.hits()
        t0 = time.perf_counter()
        rp.login("wide", scope="openid email profile groups")
        times.append(time.perf_counter() - t0)
        after = stack.fake.hits()
        delta = {k: after[k] - before[k] for k in after}
        browser.append(delta["authorize"])
        calls.append(delta["total"] - delta["authorize"])
    return times, calls, browser


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspaces", type=int, default=20)
    ap.add_argument("--latency-ms", type=int, default=50)
    ap.add_argument("--logins", type=int, default=7)
    a = ap.parse_args()
    teams = [f"ws-{i:02d}" for i in range(1, a.workspaces + 1)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        s = Stack(tmp, teams=teams, groups=True, wide_user=a.workspaces)
        try:
            def ours_cold():
                # Every login cold: no permission cache.
                s.service.stop()
                s.start_service(extra="    permissionCacheTTL: 0s\n")
                s.start_dex()

            for name, start in (
                ("dex built-in bitbucket-cloud", lambda: s.start_builtin_dex(
                    "getWorkspacePermissions: true\nteams: [" + ", ".join(teams) + "]\n")),
                ("dex + bitbucket-connector, warm (a second login within permissionCacheTTL)", s.start_dex),
                ("dex + bitbucket-connector, cold (permissionCacheTTL 0s)", ours_cold),
            ):
                start()
                for latency in (0, a.latency_ms):
                    times, calls, browser = measure(s, latency, a.logins)
                    rows.append((name, latency, times, calls, browser))
                s.dex.stop()
                os.remove(s.db)
        finally:
            s.down()
    L = a.latency_ms / 1000
    print(f"W = {a.workspaces} whitelisted workspaces, getWorkspacePermissions, L = {a.latency_ms} ms "
          f"per upstream request (the fake's delay), {a.logins} logins each after one warm-up.")
    print()
    print("| connector | L (ms) | login median (ms) | min | max | median / L | upstream calls per login | browser requests to Bitbucket |")
    print("|---|---|---|---|---|---|---|---|")
    base = {}
    for name, latency, times, calls, browser in rows:
        med = statistics.median(times)
        if latency == 0:
            base[name] = med
        ratio = f"{med / L:.2f}" if latency else "-"
        print(f"| {name} | {latency} | {med * 1000:.1f} | {min(times) * 1000:.1f} | {max(times) * 1000:.1f} "
              f"| {ratio} | {statistics.median(calls):g} | {statistics.median(browser):g} |")
    print()
    for name, latency, times, calls, browser in rows:
        if latency:
            extra = statistics.median(times) - base[name]
            print(f"- {name}: (median at L - median at 0) / L = {extra / L:.2f} L")


if __name__ == "__main__":
    main()
