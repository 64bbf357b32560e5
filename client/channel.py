"""gRPC channel set-up for one server or several replicas: target syntax, load balancing, retries.

`grpc_target(server)` turns what a user types into a gRPC target:

- `host:port` stays as it is (gRPC resolves the name; round-robin over its addresses);
- `dns:///name:port` (e.g. a Kubernetes headless Service, `dns:///camserve.default.svc.cluster.local:8500`)
  stays as it is: every address the name resolves to is a replica, and the name is resolved again
  whenever a connection drops (a server's `grpc.max_connection_age_ms` makes that happen regularly,
  so replicas added by an autoscaler get traffic);
- a comma-separated list `host:port,host:port,...` becomes the multi-address target
  `ipv4:a:p,b:q` (or `ipv6:[a]:p,[b]:q`); host names in such a list are resolved once, here;
- any other explicit target (`ipv4:`, `ipv6:`, `unix:`, `xds:`, ...) stays as it is.

With TLS and an address list, the certificate is checked against the first address: give the
servers certificates with that IP, or set the name to check with the channel option
`grpc.ssl_target_name_override`.

`channel_options()` are the options every `CamClient` channel gets: the service config below
(round-robin over every address of the target, and gRPC's own throttled retry of calls that fail
with UNAVAILABLE: a replica that stops or dies mid-call, a connection refused during a rolling
update; or with RESOURCE_EXHAUSTED: a server past its thread or concurrency limit),
keep-alive pings and a retry buffer large enough for image batches (CamClient adds its message
size limits).
"""
from __future__ import annotations

import ipaddress
import json
import socket
from typing import Iterable

SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:", "google-c2p:")
SERVICES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")

# https://github.com/grpc/grpc/blob/master/doc/service_config.md and .../grpc-proto/grpc/service_config
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": service} for service in SERVICES],
        # UNAVAILABLE means the call did not run to completion on a server that is going away (or
        # never reached one); RESOURCE_EXHAUSTED is what an overloaded server answers before it
        # runs anything (TF Serving past --grpc_max_threads: "Server Threadpool Exhausted"; a full
        # --max_concurrent_requests here). Predict, GetModelMetadata and GetModelStatus are safe to
        # run again. gRPC allows at most 5 attempts; backoff is randomised between 0 and the
        # current value, and the throttling below stops retries while most calls fail.
        "retryPolicy": {
            "maxAttempts": 5,
            "initialBackoff": "0.05s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
        },
    }],
    # Retry only while most calls succeed: each failure costs a token, each success gives back
    # 0.1, and retries stop below half of 10 tokens, so a saturated server is not hit by retry storms.
    "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
}

DEFAULT_OPTIONS: dict[str, object] = {
    "grpc.service_config": json.dumps(SERVICE_CONFIG),
    "grpc.service_config_disable_resolution": 1,  # ours, not one from DNS TXT records
    "grpc.lb_policy_name": "round_robin",  # the same as the service config says, for older resolvers
    "grpc.enable_retries": 1,
    # A call is retried only while its request fits in this buffer (gRPC's default, 256 KiB, is
    # about two 224x224 uint8 images): a batch of images must fit.
    "grpc.per_rpc_retry_buffer_size": 64 * 1024 * 1024,
    # Ping a connection that has calls in flight after 30 s of silence; close it when the ping is
    # not answered within 10 s (a replica that vanished without closing its connections).
    "grpc.keepalive_time_ms": 30_000,
    "grpc.keepalive_timeout_ms": 10_000,
    "grpc.keepalive_permit_without_calls": 0,
}


def channel_options(overrides: Iterable[tuple[str, object]] = ()) -> list[tuple[str, object]]:
    """DEFAULT_OPTIONS with `overrides` (gRPC channel options) replacing options of the same name."""
    options = dict(DEFAULT_OPTIONS)
    options.update(overrides)
    return list(options.items())


def _split_host_port(address: str) -> tuple[str, str]:
    address = address.strip()
    if address.startswith("["):  # [v6]:port
        host, sep, port = address[1:].partition("]:")
        if not sep:
            raise ValueError(f"{address!r}: an IPv6 address needs a port, as [::1]:8500")
    else:
        host, sep, port = address.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{address!r}: expected host:port (IPv6 as [addr]:port)")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r}: expected host:port")
    return host, port


def _addresses(host: str, port: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ValueError(f"cannot resolve {host!r}: {err}") from None
    found = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    v4 = [a for a in found if a.version == 4]
    return v4 or found  # IPv4 when the name has it: one list cannot mix the two


def grpc_target(server: str) -> str:
    """The gRPC target for `server`: see the module docstring."""
    server = server.strip()
    if not server:
        raise ValueError("empty server address")
    if "://" in server or server.startswith(SCHEMES) or "," not in server:
        return server
    entries = []
    for item in filter(None, (part.strip() for part in server.split(","))):
        host, port = _split_host_port(item)
        entries += [(address, port) for address in _addresses(host, port)]
    versions = {address.version for address, _ in entries}
    if len(versions) != 1:
        raise ValueError(f"{server!r} mixes IPv4 and IPv6 addresses: give one kind, or use dns:///name:port")
    unique = list(dict.fromkeys(entries))
    if versions == {4}:
        return "ipv4:" + ",".join(f"{address}:{port}" for address, port in unique)
    return "ipv6:" + ",".join(f"[{address}]:{port}" for address, port in unique)
