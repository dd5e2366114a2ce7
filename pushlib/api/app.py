"""The operator HTTP API (`pushlib-api`): a FastAPI app on the proxy's Redis.

Writes go through the same code as the CLI and the SIP workers: apps, devices, UA mappings and
the job stream through `store.SyncStore` (in a worker thread: one implementation of the app and
alias bookkeeping), subscribers through `credentials.Subscribers`; the API's own records (keys,
tenants, user uuids) and health/metrics through a redis.asyncio client. A custom notification is a
push job on the stream the dispatcher consumes, exactly as a call push.

Auth: `Authorization: Bearer <token>` (`pushlib.apikeys`); scopes per route (`send`, `read`,
`admin`); tenant-bound keys see only their tenant's users and apps (`pushlib.tenants`), anything
else is 404. Errors: `pushlib.api.errors`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from pushlib import schema
from pushlib.aor import Aor, AorError, aor_parts, parse_aor
from pushlib.api.errors import ApiError, BodyLimit, install
from pushlib.api.health import health
from pushlib.api.models import (
    AppIn,
    AppOut,
    AppPatchIn,
    AppsOut,
    CheckOut,
    DevicesOut,
    ErrorOut,
    HealthOut,
    NotificationIn,
    RemovedOut,
    SubscriberIn,
    SubscriberOut,
    UaMappingIn,
    UaMappingOut,
    UaMappingsOut,
    UserIn,
    UserOut,
    VoicemailIn,
    VoicemailOut,
    VoicemailUriIn,
)
from pushlib.apikeys import ApiKeyStore, Principal, Scope
from pushlib.appcheck import check_app
from pushlib.appcreds import (
    CredentialsError,
    check_aliases,
    check_apns_cert,
    check_apns_key,
    check_ca,
    check_service_account,
    public_view,
)
from pushlib.credentials import Subscribers
from pushlib.logutil import get_logger
from pushlib.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pushlib.metrics import render_metrics
from pushlib.models import AppCredentials, Provider, UaMapping
from pushlib.mwi import MwiError, VoicemailStore, check_voicemail_uri, record_and_push
from pushlib.notify import Notification, NotificationError, check_notification, custom_job, push_capable
from pushlib.redisconn import StoreUnavailable, async_client
from pushlib.settings import Settings
from pushlib.store import AppNameConflict, SyncStore
from pushlib.tenants import TenantError, TenantStore, visible
from pushlib.users import USER_UUID, UserMap, device_view

log = get_logger("pushlib.api")

API_VERSION = "1.0"
MAX_BODY = 64 * 1024
STORE_TIMEOUT = 2.0


@dataclass(frozen=True)
class ApiConfig:
    """`max_body`: request body limit in bytes; `metrics_open`: serve /metrics without a key."""

    max_body: int = MAX_BODY
    metrics_open: bool = False


class Backend:
    """The app's Redis clients and stores (made in the app's lifespan, closed with it)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis: Any = async_client(settings.redis_url, timeout=STORE_TIMEOUT, connect_timeout=STORE_TIMEOUT)
        self.store = SyncStore(settings.redis_url, settings, timeout=STORE_TIMEOUT)
        self.keys = ApiKeyStore(self.redis)
        self.tenants = TenantStore(self.redis)
        self.users = UserMap(self.redis)
        self.voicemail = VoicemailStore(self.store.client)

    async def aclose(self) -> None:
        await self.redis.aclose()
        self.store.close()


# ----------------------------------------------------------------------------- auth

_bearer = HTTPBearer(auto_error=False, description="an API key: `pushlib-admin keys create`")
_Creds = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def backend_of(request: Request) -> Backend:
    backend: Backend = request.app.state.backend
    return backend


async def authenticate(request: Request, creds: HTTPAuthorizationCredentials | None) -> Principal:
    if creds is None:
        raise ApiError(401, "unauthorized", "an API key is required: Authorization: Bearer <token>")
    principal = await backend_of(request).keys.authenticate(creds.credentials)
    if principal is None:
        raise ApiError(401, "unauthorized", "unknown or revoked API key")
    request.state.key_id = principal.key_id
    return principal


def need(scope: Scope, operator: bool = False) -> Callable[[Request, HTTPAuthorizationCredentials | None],
                                                           Awaitable[Principal]]:
    """A dependency: the request's principal, which must hold `scope` (and no tenant: `operator`)."""

    async def dependency(request: Request, creds: _Creds) -> Principal:
        principal = await authenticate(request, creds)
        if not principal.allows(scope):
            raise ApiError(403, "forbidden", f"this key lacks the {scope.value} scope")
        if operator and principal.tenant is not None:
            raise ApiError(403, "forbidden", "an operator-wide key (no tenant) is required")
        return principal

    return dependency


Sender = Annotated[Principal, Depends(need(Scope.SEND))]
Reader = Annotated[Principal, Depends(need(Scope.READ))]
Admin = Annotated[Principal, Depends(need(Scope.ADMIN))]
OperatorReader = Annotated[Principal, Depends(need(Scope.READ, operator=True))]
OperatorAdmin = Annotated[Principal, Depends(need(Scope.ADMIN, operator=True))]


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error answers a route gives (every one an ErrorOut)."""
    return {code: {"model": ErrorOut} for code in (401, 403, *codes)}


AUTHED_READ = errors(404, 422, 503)
AUTHED_WRITE = errors(400, 404, 409, 413, 422, 503)

# ----------------------------------------------------------------------------- lookups

UserRef = Annotated[str, Path(min_length=1, max_length=300, description="a user uuid or user@domain")]
AppId = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[!-~]+$")]
UserUuid = Annotated[str, Path(pattern=f"^{USER_UUID.pattern}$", max_length=128)]
MapName = Annotated[str, Path(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")]


async def visible_user(b: Backend, principal: Principal, ref: str) -> Aor:
    """The AOR `ref` names, if the principal may see it (404 otherwise: unmapped uuid, other tenant)."""
    try:
        aor = await b.users.resolve(ref)
    except AorError as exc:
        raise ApiError(422, "invalid_user", str(exc)) from None
    if aor is None:
        raise ApiError(404, "not_found", "no such user")
    if not visible(principal, await b.tenants.owner_of_user(aor)):
        raise ApiError(404, "not_found", "no such user")
    return aor


async def visible_app(b: Backend, principal: Principal, provider: Provider, app_id: str
                      ) -> tuple[AppCredentials, str | None]:
    """The app `app_id` names (its id or an alias) and its tenant, if the principal may see it."""
    app = await run_in_threadpool(b.store.app, provider.value, app_id)
    owner = None if app is None else await b.tenants.owner_of_app(provider.value, app.app_id)
    if app is None or not visible(principal, owner):
        raise ApiError(404, "not_found", f"no app {provider.value}:{app_id}")
    return app, owner


def _own_name(app: AppCredentials, asked: str) -> None:
    if app.app_id != asked:
        raise ApiError(409, "is_alias", f"{app.provider.value}:{asked} is an alias of app "
                                         f"{app.provider.value}:{app.app_id}: name the app")


def app_out(app: AppCredentials, owner: str | None, status: dict[str, Any] | None = None) -> AppOut:
    return AppOut.model_validate({**public_view(app, status), "tenant": owner})


def app_from_input(provider: Provider, app_id: str, body: AppIn, kept_aliases: tuple[str, ...]) -> AppCredentials:
    """The AppCredentials a PUT describes (CredentialsError for anything unusable)."""
    given = [k for k in ("apns_token", "apns_certificate", "fcm_service_account") if getattr(body, k) is not None]
    if len(given) != 1:
        raise CredentialsError("give exactly one of apns_token, apns_certificate, fcm_service_account")
    if (provider is Provider.FCM) != (given[0] == "fcm_service_account"):
        raise CredentialsError(f"{given[0]} is not a credential of a {provider.value} app")
    try:
        schema.check_app_name(app_id)
    except ValueError as exc:
        raise CredentialsError(str(exc)) from None
    common: dict[str, Any] = {"sandbox": body.sandbox, "enabled": body.enabled, "custom_host": body.host,
                              "ca_pem": check_ca(body.ca_pem, body.host)}
    if provider is Provider.APNS and body.aliases:
        raise CredentialsError("aliases are names FCM devices give an app; APNs apps have none")
    if body.apns_token is not None:
        t = body.apns_token
        return AppCredentials(Provider.APNS, app_id, apns_key_pem=check_apns_key(t.key_pem),
                              apns_key_id=t.key_id, apns_team_id=t.team_id, **common)
    if body.apns_certificate is not None:
        cert_pem, key_pem = check_apns_cert(body.apns_certificate.cert_pem, body.apns_certificate.key_pem)
        return AppCredentials(Provider.APNS, app_id, apns_cert_pem=cert_pem, apns_cert_key_pem=key_pem, **common)
    text, project = check_service_account(json.dumps(body.fcm_service_account), parse_key=True)
    if project != app_id:
        raise CredentialsError(f"the service account is for project {project[:80]!r}, not {app_id[:80]!r}")
    aliases = kept_aliases if body.aliases is None else check_aliases(body.aliases)
    return AppCredentials(Provider.FCM, app_id, fcm_service_account=text, aliases=aliases, **common)


async def save_app(b: Backend, principal: Principal, app: AppCredentials, claim: bool) -> None:
    """Store `app`; `claim`: first give it to the principal's tenant (released when the save fails)."""
    provider = app.provider.value
    if claim and principal.tenant is not None:
        try:
            await b.tenants.add_app(principal.tenant, provider, app.app_id)
        except TenantError:
            raise ApiError(404, "not_found", f"no app {provider}:{app.app_id}") from None
    try:
        await run_in_threadpool(b.store.save_app, app)
    except ValueError as exc:
        if claim and principal.tenant is not None:
            await b.tenants.remove_app(principal.tenant, provider, app.app_id)
        if isinstance(exc, AppNameConflict):
            message = str(exc) if principal.tenant is None else f"{provider}:{exc.name} already names another app"
            raise ApiError(409, "name_taken", message) from None
        raise ApiError(422, "invalid_app", str(exc)) from None


# ----------------------------------------------------------------------------- the app


def create_app(settings: Settings, config: ApiConfig | None = None) -> FastAPI:
    config = config or ApiConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.backend = Backend(settings)
        try:
            yield
        finally:
            await app.state.backend.aclose()

    app = FastAPI(
        title="pushlib API", version=API_VERSION, lifespan=lifespan,
        description="Operator API of the SIP push proxy: Wazo-compatible custom notifications, apps and "
                    "their credentials, UA mappings, subscribers, users' devices, health and metrics.",
    )
    install(app)

    @app.middleware("http")
    async def log_request(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        code = getattr(request.state, "error_code", None)
        log.info("api: %s %s -> %d%s key=%s", request.method, request.url.path, response.status_code,
                 f" {code}" if code else "", getattr(request.state, "key_id", "-"))
        return response

    app.add_middleware(BodyLimit, limit=config.max_body)
    v = f"/{API_VERSION}"

    # --- notifications -------------------------------------------------------------------------

    @app.post(f"{v}/mobile/notifications", status_code=204, response_class=Response, tags=["notifications"],
              responses=errors(400, 404, 409, 413, 422, 503))
    async def send_notification(request: Request, body: NotificationIn, principal: Sender) -> Response:
        """Queue a custom notification to every push-capable device of the user (Wazo-compatible)."""
        b = backend_of(request)
        now = time.time()
        notification = Notification(body.notification_type, body.title, body.body, dict(body.extra))
        try:
            check_notification(notification, settings, now)
        except NotificationError as exc:
            raise ApiError(422, exc.code, str(exc)) from None
        aor = await visible_user(b, principal, body.user_uuid)
        devices = await run_in_threadpool(b.store.devices, aor)
        if not any(push_capable(d, now) for d in devices):
            raise ApiError(409, "no_push_device", f"user {aor} has no device a notification can reach")
        job = custom_job(notification, aor, settings, now)
        await run_in_threadpool(b.store.enqueue, job)
        log.info("api: queued %s job %s for %s (type %s)", job.kind.value, job.job_id, aor, body.notification_type)
        return Response(status_code=204)

    @app.post(f"{v}/users/{{user}}/voicemail", response_model=VoicemailOut, tags=["notifications"],
              responses=errors(404, 409, 413, 422, 503))
    async def post_voicemail(request: Request, user: UserRef, body: VoicemailIn, principal: Sender) -> VoicemailOut:
        """The user's voicemail counts, for voicemail systems that send no MWI NOTIFY: as a SIP
        message summary, a rise in new messages queues a voicemailReceived push."""
        b = backend_of(request)
        aor = await visible_user(b, principal, user)
        now = time.time()
        devices = await run_in_threadpool(b.store.devices, aor)
        if not any(push_capable(d, now) for d in devices):
            raise ApiError(409, "no_push_device", f"user {aor} has no device a notification can reach")
        caller = (body.caller_name or "", body.caller_number or "")
        previous, pushed = await run_in_threadpool(record_and_push, b.voicemail, b.store.enqueue, aor,
                                                   body.new_messages, body.old_messages, now,
                                                   settings.message_ttl, caller)
        log.info("api: voicemail counts for %s new=%d old=%d previous=%s pushed=%s", aor, body.new_messages,
                 body.old_messages, previous, pushed)
        return VoicemailOut(aor=aor, new_messages=body.new_messages, old_messages=body.old_messages,
                            previous_new=previous, pushed=pushed)

    # --- users and their devices -----------------------------------------------------------------

    @app.get(f"{v}/users/{{user_uuid}}", response_model=UserOut, tags=["users"], responses=AUTHED_READ)
    async def get_user(request: Request, user_uuid: UserUuid, principal: Reader) -> UserOut:
        """The address of record a user uuid names."""
        aor = await visible_user(backend_of(request), principal, user_uuid)
        return UserOut(user_uuid=user_uuid, aor=aor)

    @app.put(f"{v}/users/{{user_uuid}}", response_model=UserOut, tags=["users"], responses=AUTHED_WRITE)
    async def put_user(request: Request, user_uuid: UserUuid, body: UserIn, principal: Admin) -> UserOut:
        """Map a user uuid to an address of record (replacing its mapping)."""
        b = backend_of(request)
        current = await b.users.get(user_uuid)
        if current is not None:
            await visible_user(b, principal, user_uuid)
        try:
            aor = parse_aor(body.aor)
        except AorError as exc:
            raise ApiError(422, "invalid_user", str(exc)) from None
        if not visible(principal, await b.tenants.owner_of_user(aor)):
            raise ApiError(404, "not_found", "no such user")
        await b.users.set(user_uuid, aor)
        return UserOut(user_uuid=user_uuid, aor=aor)

    @app.delete(f"{v}/users/{{user_uuid}}", status_code=204, response_class=Response, tags=["users"],
                responses=AUTHED_READ)
    async def delete_user(request: Request, user_uuid: UserUuid, principal: Admin) -> Response:
        """Forget a user uuid's mapping (the user's devices and credentials stay)."""
        b = backend_of(request)
        await visible_user(b, principal, user_uuid)
        await b.users.delete(user_uuid)
        return Response(status_code=204)

    @app.get(f"{v}/users/{{user}}/devices", response_model=DevicesOut, tags=["users"], responses=AUTHED_READ)
    async def list_devices(request: Request, user: UserRef, principal: Reader) -> DevicesOut:
        """The user's push devices (never their tokens)."""
        b = backend_of(request)
        aor = await visible_user(b, principal, user)
        now = time.time()
        devices = await run_in_threadpool(b.store.devices, aor)
        return DevicesOut.model_validate({"aor": aor, "devices": [device_view(d, now) for d in devices]})

    @app.delete(f"{v}/users/{{user}}/devices", response_model=RemovedOut, tags=["users"], responses=AUTHED_READ)
    async def remove_devices(request: Request, user: UserRef, principal: Admin) -> RemovedOut:
        """Remove every push device of the user (their SIP bindings stay until they expire)."""
        b = backend_of(request)
        aor = await visible_user(b, principal, user)
        return RemovedOut(removed=await run_in_threadpool(b.store.remove_all_devices, aor))

    @app.delete(f"{v}/users/{{user}}/devices/{{device_id}}", status_code=204, response_class=Response,
                tags=["users"], responses=AUTHED_READ)
    async def remove_device(request: Request, user: UserRef,
                            device_id: Annotated[str, Path(min_length=1, max_length=300)],
                            principal: Admin) -> Response:
        """Remove one push device of the user."""
        b = backend_of(request)
        aor = await visible_user(b, principal, user)
        if not await run_in_threadpool(b.store.remove_device, aor, device_id):
            raise ApiError(404, "not_found", f"no device {device_id[:80]} of {aor}")
        return Response(status_code=204)

    # --- subscribers (SIP digest credentials) ----------------------------------------------------

    @app.get(f"{v}/subscribers/{{user}}", response_model=SubscriberOut, tags=["subscribers"],
             responses=AUTHED_READ)
    async def get_subscriber(request: Request, user: UserRef, principal: Reader) -> SubscriberOut:
        """Whether the user has SIP credentials, and their realm (never the HA1)."""
        b = backend_of(request)
        aor = await visible_user(b, principal, user)
        raw = await b.redis.hgetall(schema.subscriber_key(*aor_parts(aor)))
        if not raw.get("ha1"):
            raise ApiError(404, "not_found", f"{aor} has no SIP credentials")
        return SubscriberOut(aor=aor, realm=raw.get("realm"), voicemail_uri=raw.get("voicemail"))

    @app.put(f"{v}/subscribers/{{user}}/voicemail", status_code=204, response_class=Response,
             tags=["subscribers"], responses=AUTHED_WRITE)
    async def put_voicemail_uri(request: Request, user: UserRef, body: VoicemailUriIn, principal: Admin) -> Response:
        """Set the user's voicemail URI: its unanswered push calls go there (before FALLBACK_URI)."""
        b = backend_of(request)
        aor = await visible_user(b, principal, user)
        try:
            uri = check_voicemail_uri(body.uri)
        except MwiError as exc:
            raise ApiError(422, "invalid_voicemail_uri", str(exc)) from None
        await run_in_threadpool(b.voicemail.set_uri, aor, uri)
        return Response(status_code=204)

    @app.delete(f"{v}/subscribers/{{user}}/voicemail", status_code=204, response_class=Response,
                tags=["subscribers"], responses=AUTHED_READ)
    async def delete_voicemail_uri(request: Request, user: UserRef, principal: Admin) -> Response:
        """Forget the user's voicemail URI (FALLBACK_URI applies again)."""
        b = backend_of(request)
        aor = await visible_user(b, principal, user)
        if not await run_in_threadpool(b.voicemail.set_uri, aor, None):
            raise ApiError(404, "not_found", f"{aor} has no voicemail URI")
        return Response(status_code=204)

    @app.put(f"{v}/subscribers/{{user}}", status_code=204, response_class=Response, tags=["subscribers"],
             responses=AUTHED_WRITE)
    async def put_subscriber(request: Request, user: UserRef, body: SubscriberIn, principal: Admin) -> Response:
        """Set the user's SIP password (stored as HA1 only; realm defaults to the domain)."""
        b = backend_of(request)
        aor = await visible_user(b, principal, user)
        name, domain = aor_parts(aor)
        await run_in_threadpool(Subscribers(b.store.client).set_password, name, domain, body.password, body.realm)
        return Response(status_code=204)

    @app.delete(f"{v}/subscribers/{{user}}", status_code=204, response_class=Response, tags=["subscribers"],
                responses=AUTHED_READ)
    async def delete_subscriber(request: Request, user: UserRef, principal: Admin) -> Response:
        """Remove the user's SIP credentials (its REGISTERs are refused from then on)."""
        b = backend_of(request)
        aor = await visible_user(b, principal, user)
        if not await b.redis.delete(schema.subscriber_key(*aor_parts(aor))):
            raise ApiError(404, "not_found", f"{aor} has no SIP credentials")
        return Response(status_code=204)

    # --- apps ------------------------------------------------------------------------------------

    @app.get(f"{v}/apps", response_model=AppsOut, tags=["apps"], responses=errors(503))
    async def list_apps(request: Request, principal: Reader) -> AppsOut:
        """The apps this key may see (credentials shown as fingerprints and expiry dates only)."""
        b = backend_of(request)
        names = sorted(await b.redis.hkeys(schema.APP_INDEX_KEY))
        owners = await b.tenants.app_owners()

        def load() -> list[AppCredentials]:
            found = [b.store.app(*name.split(":", 1)) for name in names if ":" in name]
            return [a for a, name in zip(found, names, strict=True)
                    if a is not None and schema.app_index_field(a.provider, a.app_id) == name]

        apps = await run_in_threadpool(load)
        owner = {a: owners.get(schema.app_index_field(a.provider, a.app_id)) for a in apps}
        return AppsOut(apps=[app_out(a, owner[a]) for a in apps if visible(principal, owner[a])])

    @app.get(f"{v}/apps/{{provider}}/{{app_id}}", response_model=AppOut, tags=["apps"], responses=AUTHED_READ)
    async def get_app(request: Request, provider: Provider, app_id: AppId, principal: Reader) -> AppOut:
        """One app (by its id or an alias) with its status: last error, environment suspicion, counters."""
        b = backend_of(request)
        app_, owner = await visible_app(b, principal, provider, app_id)
        status = await run_in_threadpool(b.store.app_status, provider.value, app_.app_id)
        return app_out(app_, owner, status)

    @app.put(f"{v}/apps/{{provider}}/{{app_id}}", response_model=AppOut, tags=["apps"], responses=AUTHED_WRITE)
    async def put_app(request: Request, provider: Provider, app_id: AppId, body: AppIn, principal: Admin) -> AppOut:
        """Create or replace an app's credentials. They are validated first and never returned."""
        b = backend_of(request)
        stored = await run_in_threadpool(b.store.app, provider.value, app_id)
        owner = None
        if stored is not None:
            owner = await b.tenants.owner_of_app(provider.value, stored.app_id)
            if not visible(principal, owner):
                raise ApiError(404, "not_found", f"no app {provider.value}:{app_id}")
        kept = stored.aliases if stored is not None and stored.app_id == app_id else ()
        try:
            new = app_from_input(provider, app_id, body, kept)
        except CredentialsError as exc:
            raise ApiError(422, "invalid_credentials", str(exc)) from None
        await save_app(b, principal, new, claim=stored is None)
        return app_out(new, owner if stored is not None else principal.tenant)

    @app.patch(f"{v}/apps/{{provider}}/{{app_id}}", response_model=AppOut, tags=["apps"], responses=AUTHED_WRITE)
    async def patch_app(request: Request, provider: Provider, app_id: AppId, body: AppPatchIn,
                        principal: Admin) -> AppOut:
        """Enable or disable an app, or replace its aliases (FCM), keeping its credentials."""
        b = backend_of(request)
        app_, owner = await visible_app(b, principal, provider, app_id)
        _own_name(app_, app_id)
        changed = app_
        if body.enabled is not None:
            changed = replace(changed, enabled=body.enabled)
        if body.aliases is not None:
            if provider is not Provider.FCM and body.aliases:
                raise ApiError(422, "invalid_app", "APNs apps have no aliases")
            try:
                changed = replace(changed, aliases=check_aliases(body.aliases))
            except CredentialsError as exc:
                raise ApiError(422, "invalid_app", str(exc)) from None
        await save_app(b, principal, changed, claim=False)
        return app_out(changed, owner)

    @app.delete(f"{v}/apps/{{provider}}/{{app_id}}", status_code=204, response_class=Response, tags=["apps"],
                responses=errors(404, 409, 422, 503))
    async def delete_app(request: Request, provider: Provider, app_id: AppId, principal: Admin) -> Response:
        """Remove an app and its aliases: devices naming it get 555 on REGISTER and are no longer pushed."""
        b = backend_of(request)
        app_, _ = await visible_app(b, principal, provider, app_id)
        _own_name(app_, app_id)
        await run_in_threadpool(b.store.remove_app, provider.value, app_id)
        await b.tenants.remove_app(None, provider.value, app_id)
        return Response(status_code=204)

    @app.post(f"{v}/apps/{{provider}}/{{app_id}}/check", response_model=CheckOut, tags=["apps"],
              responses=AUTHED_READ)
    async def check(request: Request, provider: Provider, app_id: AppId, principal: Admin) -> CheckOut:
        """Connect to the app's provider host and report whether its authentication works."""
        app_, _ = await visible_app(backend_of(request), principal, provider, app_id)
        return CheckOut.model_validate((await check_app(app_)).public())

    # --- UA mappings (operator-wide) -----------------------------------------------------------

    @app.get(f"{v}/uamaps", response_model=UaMappingsOut, tags=["uamaps"], responses=errors(503))
    async def list_uamaps(request: Request, principal: OperatorReader) -> UaMappingsOut:
        """The legacy User-Agent mappings (Kazoo style)."""
        found = await run_in_threadpool(backend_of(request).store.ua_mappings)
        return UaMappingsOut(mappings=[UaMappingOut(name=m.name, regex=m.user_agent_regex, app_param=m.app_param,
                                                    type_param=m.type_param, token_param=m.token_param)
                                       for m in found])

    @app.put(f"{v}/uamaps/{{name}}", response_model=UaMappingOut, tags=["uamaps"], responses=AUTHED_WRITE)
    async def put_uamap(request: Request, name: MapName, body: UaMappingIn, principal: OperatorAdmin) -> UaMappingOut:
        """Create or replace a mapping: a User-Agent regex and the Contact params holding app, type, token."""
        try:
            re.compile(body.regex)
        except (re.error, RecursionError, OverflowError) as exc:
            raise ApiError(422, "invalid_regex", f"bad User-Agent regex: {exc}") from None
        mapping = UaMapping(name, body.regex, body.app_param, body.type_param, body.token_param)
        await run_in_threadpool(backend_of(request).store.save_ua_mapping, mapping)
        return UaMappingOut(name=name, regex=body.regex, app_param=body.app_param, type_param=body.type_param,
                            token_param=body.token_param)

    @app.delete(f"{v}/uamaps/{{name}}", status_code=204, response_class=Response, tags=["uamaps"],
                responses=AUTHED_READ)
    async def delete_uamap(request: Request, name: MapName, principal: OperatorAdmin) -> Response:
        """Remove a mapping."""
        if not await run_in_threadpool(backend_of(request).store.remove_ua_mapping, name):
            raise ApiError(404, "not_found", f"no UA mapping {name}")
        return Response(status_code=204)

    # --- operations ------------------------------------------------------------------------------

    @app.get("/health", response_model=HealthOut, tags=["operations"], responses={503: {"model": HealthOut}})
    async def get_health(request: Request, response: Response) -> dict[str, Any]:
        """Redis reachable, a dispatcher alive, job stream length/pending/lag. No key needed;
        503 when Redis is down or no dispatcher is alive."""
        doc = await health(backend_of(request).redis, settings)
        if doc["status"] != "ok":
            response.status_code = 503
        return doc

    metrics_scope = [] if config.metrics_open else [Depends(need(Scope.READ, operator=True))]

    @app.get("/metrics", response_class=Response, tags=["operations"], dependencies=metrics_scope,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **errors(503)})
    async def get_metrics(request: Request) -> Response:
        """Prometheus text: pushes, latency, stream lag... (an operator-wide key with read scope,
        unless PUSHLIB_API_METRICS_OPEN=1)."""
        try:
            body = await render_metrics(backend_of(request).redis, stream=settings.stream, group=settings.group)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"metrics: {exc.__class__.__name__}") from exc
        return Response(content=body, media_type=METRICS_CONTENT_TYPE)

    return app
