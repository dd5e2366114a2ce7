"""The SIP side's Prometheus metrics, kept by Kamailio itself (xhttp_prom, kamailio.cfg WITH_METRICS).

The figures live in Kamailio's shared memory (xhttp_prom counters and histograms), so every SIP
worker adds to the same series and a scrape of `http://METRICS_IP:METRICS_PORT/metrics` sees the
node as a whole, with Kamailio's own statistics next to them. The router calls one method per
event; when WITH_METRICS is off (or xhttp_prom is not loaded, e.g. a role-mode host without it)
every method returns at once, before building any string.

Exported (xhttp_prom prefixes them with `kamailio_`):
- `pusher_parked_calls` gauge: calls in their wait window on this node (set at each scrape).
- `pusher_calls_total{event}` counter: `parked`, `woken` (a pushed device's REGISTER resumed the
  call), `answered`, `canceled`, `timeout` (the wait window ran out), `rejected`, `fallback`
  (relayed to FALLBACK_URI), `other` (e.g. the push could not be queued).
- `pusher_wake_seconds` histogram: from the INVITE parked to the REGISTER that resumed it.
- `pusher_push_registers_total{provider}`: REGISTERs saving a push device, by provider.
- `pusher_register_rejected_total{code}`: REGISTERs refused (555: unsupported push provider,
  400: malformed push parameters, and the other refusals of `calls.plan_register`).

Label values come from fixed sets (the event names here, `Provider` values, SIP codes chosen by
`pushlib.calls`), never from the message.
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any

from pushlib.models import Provider

PARKED_GAUGE = "pusher_parked_calls"
CALLS = "pusher_calls_total"
WAKE_HISTOGRAM = "pusher_wake_seconds"
REGISTERS = "pusher_push_registers_total"
REJECTED = "pusher_register_rejected_total"
PARKED_AT_TABLE = "pnmt"  # call key -> time.time() it was parked (kamailio.cfg, WITH_METRICS only)
# entries of the router's wait-window table (kemi/router.py WAIT_TABLE): one per call in its window
_PARKED_COUNT_PV = "$shtcn(pnwait=>~~.)"
DEFAULT_ALLOW = "127.0.0.0/8,::1"
_END_EVENTS = frozenset(("answered", "canceled", "timeout"))
_PROVIDERS = frozenset(p.value for p in Provider)
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def allowed_networks(text: str | None) -> tuple[_Network, ...]:
    """METRICS_ALLOW ("net,net", default loopback) as networks; ValueError names a bad entry."""
    nets = []
    for part in (text or DEFAULT_ALLOW).split(","):
        part = part.strip()
        if part:
            try:
                nets.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"METRICS_ALLOW: not a network: {part[:60]!r}") from None
    return tuple(nets)


def source_allowed(source: str, nets: tuple[_Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(source.strip("[]"))
    except ValueError:
        return False
    return any(address in net for net in nets)


def end_event(reason: str) -> str:
    """The `event` label of a parked call's end, from `calls.end_reason` (or the router's own)."""
    if reason in _END_EVENTS:
        return reason
    return "rejected" if reason.startswith("rejected-") else "other"


class KsrMetrics:
    """One per router (every process shares the xhttp_prom series in shared memory)."""

    def __init__(self, ksr: Any, enabled: bool, port: int = 0, allow: tuple[_Network, ...] = ()) -> None:
        self._ksr = ksr
        self.enabled = enabled
        self.port = port
        self.allow = allow

    @classmethod
    def from_defines(cls, ksr: Any, get_def: Any) -> KsrMetrics:
        """From the cfg defines (`get_def(name)` -> value or None): on with WITH_METRICS when
        xhttp_prom is loaded."""
        if get_def("WITH_METRICS") is None or not hasattr(ksr, "xhttp_prom"):
            return cls(ksr, False)
        port = str(get_def("METRICS_PORT") or "").strip()
        allow = (get_def("METRICS_ALLOW") or "").strip().strip('"')
        return cls(ksr, True, int(port) if port.isdigit() else 0, allowed_networks(allow or None))

    def _call(self, event: str) -> None:
        self._ksr.xhttp_prom.counter_inc_l1(CALLS, 1, event)

    def parked(self, key: str) -> None:
        if self.enabled:
            self._call("parked")
            self._ksr.htable.sht_sets(PARKED_AT_TABLE, key, repr(time.time()))

    def woken(self, keys: list[str]) -> None:
        """A pushed device's REGISTER resumed these calls."""
        if not self.enabled:
            return
        now = time.time()
        for key in keys:
            self._call("woken")
            parked_at = self._ksr.htable.sht_get(PARKED_AT_TABLE, key)
            try:
                seconds = max(0.0, now - float(parked_at)) if parked_at is not None else None
            except ValueError:
                seconds = None
            if seconds is not None:
                self._ksr.xhttp_prom.histogram_observe_l0(WAKE_HISTOGRAM, f"{seconds:.4f}")

    def ended(self, key: str, reason: str) -> None:
        if self.enabled:
            self._call(end_event(reason))
            self._ksr.htable.sht_rm(PARKED_AT_TABLE, key)

    def fallback(self) -> None:
        if self.enabled:
            self._call("fallback")

    def push_register(self, provider: str) -> None:
        if self.enabled and provider in _PROVIDERS:
            self._ksr.xhttp_prom.counter_inc_l1(REGISTERS, 1, provider)

    def register_rejected(self, code: int) -> None:
        if self.enabled and 300 <= code < 700:
            self._ksr.xhttp_prom.counter_inc_l1(REJECTED, 1, str(code))

    def non_http_on_metrics_port(self, received_port: int) -> bool:
        """Whether a SIP request came in on the metrics listener (the router refuses it)."""
        return self.enabled and received_port == self.port

    def http_request(self, source: str, received_port: int) -> None:
        """xhttp's event route: answer a scrape (or 403/404)."""
        ksr = self._ksr
        if not self.enabled or received_port != self.port or not source_allowed(source, self.allow):
            ksr.xhttp.xhttp_reply(403, "Forbidden", "text/plain", "forbidden\n")
            return
        if ksr.xhttp_prom.check_uri() <= 0:
            ksr.xhttp.xhttp_reply(404, "Not Found", "text/plain", "metrics are at /metrics\n")
            return
        ksr.xhttp_prom.gauge_set_l0(PARKED_GAUGE, str(ksr.pv.geti(_PARKED_COUNT_PV) or 0))
        ksr.xhttp_prom.dispatch()
