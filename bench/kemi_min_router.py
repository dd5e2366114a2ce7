"""bench/kemi-min-capacity.cfg's routing: bench/native-capacity.cfg's request_route and
failure_route, step for step, in Python (see that file for what each step is for). The one Redis
write goes through redis-py, as the product's do. Not product code: a measuring stick for what
routing in Python costs by itself."""

from __future__ import annotations

import hashlib
import site
import sys
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
site.addsitedir(
    str(_ROOT / ".venv" / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages")
)

import KSR  # noqa: E402
import redis  # noqa: E402


def mod_init() -> Router:
    return Router()


class Router:
    def __init__(self) -> None:
        self.wait_ms = int(KSR.kx.get_def("WAIT_MS") or 5000)
        self.redis_url = str(KSR.kx.get_def("REDIS_URL") or "").strip('"')
        self._redis: Any = None

    def child_init(self, rank: int) -> int:
        return 0

    def _r(self) -> Any:
        if self._redis is None:  # opened in the worker, after the fork
            self._redis = redis.Redis.from_url(self.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        return self._redis

    def ksr_request_route(self, msg: object) -> int:
        if str(KSR.pv.get("$rU") or "").startswith("pn-park-") and KSR.is_myself_srcip() > 0:
            return 1
        if KSR.maxfwd.process_maxfwd(10) < 0:
            KSR.sl.sl_send_reply(483, "Too Many Hops")
            return 1
        if KSR.is_OPTIONS() and KSR.pv.get("$rU") is None:
            KSR.sl.sl_send_reply(200, "Keepalive")
            return 1
        if KSR.is_CANCEL():
            if KSR.tm.t_check_trans() > 0:
                KSR.tm.t_relay()
            return 1
        if KSR.siputils.has_totag() > 0:
            if KSR.rr.loose_route() > 0:
                if KSR.tm.t_relay() < 0:
                    KSR.sl.sl_reply_error()
                return 1
            if KSR.is_ACK():
                if KSR.tm.t_check_trans() > 0:
                    KSR.tm.t_relay()
                return 1
            KSR.sl.sl_send_reply(404, "Not here")
            return 1
        if KSR.tmx.t_precheck_trans() > 0:
            KSR.tm.t_check_trans()
            return 1
        KSR.tm.t_check_trans()
        if KSR.is_REGISTER():
            self.register()
        elif KSR.is_INVITE():
            self.invite()
        else:
            KSR.sl.sl_send_reply(404, "Not Found")
        return 1

    def register(self) -> None:
        if KSR.registrar.save("location", 0x02) < 0:  # no reply yet: the parked call's branch first
            KSR.registrar.reg_send_reply()
            return
        aor = f"sip:{KSR.pv.get('$tU')}@{KSR.pv.get('$td')}"
        if KSR.htable.sht_get("park", aor) is not None:
            KSR.htable.sht_rm("park", aor)
            KSR.tsilo.ts_append_by_contact("location", aor)
        KSR.registrar.reg_send_reply()

    def invite(self) -> None:
        if KSR.registrar.registered("location") < 0:
            KSR.sl.sl_send_reply(404, "Not Found")
            return
        aor = f"sip:{KSR.pv.get('$rU')}@{KSR.pv.get('$rd')}"
        KSR.rr.record_route()
        if KSR.tm.t_newtran() < 0:
            KSR.sl.sl_reply_error()
            return
        KSR.tsilo.ts_store_uri(aor)
        call_id = str(KSR.pv.get("$ci"))
        self._r().xadd("pnjobs", {"kind": "incomingCall", "aor": aor, "call_id": call_id})
        KSR.tm.t_set_fr(120000, self.wait_ms)
        tag = hashlib.md5(call_id.encode()).hexdigest()
        park = f"sip:pn-park-{tag}@{KSR.pv.get('$Ri')}:{KSR.pv.get('$Rp')};transport=udp"
        KSR.pv.sets("$ru", park)
        KSR.pv.sets("$du", park)
        KSR.tm.t_reply(100, "Trying")
        KSR.tm.t_on_failure("ksr_park_end")
        if KSR.tm.t_relay() < 0:
            KSR.tm.t_reply(500, "Server Error")
            return
        KSR.htable.sht_seti("park", aor, 1)

    def ksr_park_end(self, msg: object) -> int:
        if KSR.tm.t_is_canceled() < 0:
            KSR.tm.t_reply(480, "Temporarily Unavailable")
        return 1

    def ksr_reply_route(self, msg: object) -> int:
        return 1

    def ksr_onreply_route(self, msg: object) -> int:
        return 1

    def ksr_onsend_route(self, msg: object) -> int:
        return 1
