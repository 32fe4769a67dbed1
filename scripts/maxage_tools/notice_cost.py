"""What a notice costs the server (scripts/notice-cost, issue #28).

N RESP3 connections (10,000) opt in with MAXAGE.NOTICE while the max age is ten minutes; then
`CONFIG SET maxage.max-age-ms` brings every deadline within the notice's lead, so the module
tells all N at once (`max-evictions-per-sec 0`: no pacing). The cost is the module's wake-up
time (INFO `maxage_wakeup_us_total`) from the CONFIG SET until every notice is out, per notice.

The baseline, measured in the same run on the same server: N connections that did not opt in,
retired by the same CONFIG SET (wake-up time per retirement, which includes the close). It is
measured twice (A/A): the noise floor of the ratio.

    scripts/notice-cost [--clients N] [--flavor redis|valkey] [--json FILE]
"""

import argparse
import asyncio
import json
import sys
import time

from maxage_tools.resp import encode as encode_bytes
from maxage_tools.servers import Server


def encode(words):
    return encode_bytes([word.encode() for word in words])


def info(port, section="maxage"):
    import socket

    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(encode(["INFO", section]))
        data = b""
        while True:
            chunk = sock.recv(65536)
            data += chunk
            if data.startswith(b"$"):
                header, _, rest = data.partition(b"\r\n")
                if len(rest) >= int(header[1:]):
                    break
        fields = {}
        for line in data.decode().splitlines():
            name, sep, value = line.partition(":")
            if sep:
                fields[name] = value.strip()
        return fields


def admin(port, *argv):
    import socket

    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(encode(list(argv)))
        return sock.recv(65536)


async def open_clients(port, count, opt_in):
    """Opens `count` connections (opted in or plain); returns their writers and readers."""
    connections = []
    for start in range(0, count, 500):
        batch = await asyncio.gather(
            *[
                asyncio.open_connection("127.0.0.1", port)
                for _ in range(start, min(count, start + 500))
            ]
        )
        for reader, writer in batch:
            if opt_in:
                writer.write(
                    encode(["HELLO", "3"])
                    + encode(["CLIENT", "TRACKING", "ON", "OPTIN"])
                    + encode(["CLIENT", "CACHING", "YES"])
                    + encode(["MAXAGE.NOTICE"])
                )
            connections.append((reader, writer))
        if opt_in:
            await asyncio.gather(*[settle_opt_in(r, w) for r, w in batch])
    return connections


async def settle_opt_in(reader, writer):
    seen = b""
    while b"no-push-reason" not in seen:
        seen += await reader.read(65536)
    await asyncio.sleep(0.05)
    try:
        seen += await asyncio.wait_for(reader.read(65536), 0.01)
    except TimeoutError:
        pass
    if b"key-tracked\r\n:0" in seen:
        key = seen.split(b"$3\r\nkey\r\n")[1].split(b"\r\n")[1].decode()
        writer.write(encode(["CLIENT", "CACHING", "YES"]) + encode(["MAXAGE.NOTICEKEY", key]))
        got = b""
        while got.count(b"+OK") < 2:
            got += await reader.read(65536)


def wait_for(port, field, target, timeout=120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        fields = info(port)
        if int(fields.get(field, 0)) >= target:
            return fields
        time.sleep(0.05)
    raise RuntimeError(f"{field} did not reach {target}")


async def one_round(flavor, clients, opt_in):
    """Wake-up microseconds per notice (opt_in) or per retirement (plain)."""
    with Server(
        flavor,
        module_args=[
            "max-age-ms",
            "600000",
            "jitter-pct",
            "0",
            "notice-lead-ms",
            "5000",
            "max-evictions-per-sec",
            "0",
        ],
        # Room for the N clients and the script's own INFO connections.
        extra_config=[f"maxclients {clients + 100}"],
    ) as server:
        started = time.monotonic()
        connections = await open_clients(server.port, clients, opt_in)
        kind = "opted-in" if opt_in else "plain"
        print(
            f"notice-cost: {flavor}: {clients} {kind} connections in {time.monotonic() - started:.1f} s",
            file=sys.stderr,
        )
        before = info(server.port)
        admin(server.port, "CONFIG", "SET", "maxage.max-age-ms", "3000")
        field = "maxage_notices_sent" if opt_in else "maxage_evicted_connections"
        after = wait_for(server.port, field, clients)
        for _, writer in connections:
            writer.close()
        spent = int(after["maxage_wakeup_us_total"]) - int(before["maxage_wakeup_us_total"])
        return spent / clients, int(after["maxage_longest_wakeup_us"])


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--flavor", action="append", choices=["redis", "valkey"])
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {}
    for flavor in args.flavor or ["redis", "valkey"]:
        baseline_a, _ = asyncio.run(one_round(flavor, args.clients, opt_in=False))
        notice, longest = asyncio.run(one_round(flavor, args.clients, opt_in=True))
        baseline_b, _ = asyncio.run(one_round(flavor, args.clients, opt_in=False))
        baseline = (baseline_a + baseline_b) / 2
        results[flavor] = {
            "clients": args.clients,
            "us_per_notice": round(notice, 2),
            "us_per_retirement": round(baseline, 2),
            "notice_over_retirement": round(notice / baseline, 3),
            "aa_retirement_ratio": round(baseline_b / baseline_a, 3),
            "longest_wakeup_us_with_notices": longest,
        }
        r = results[flavor]
        print(
            f"{flavor}: {r['us_per_notice']} us a notice, {r['us_per_retirement']} us a retirement "
            f"(ratio {r['notice_over_retirement']}, A/A {r['aa_retirement_ratio']}), "
            f"longest wake-up {longest} us, {args.clients} clients"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
