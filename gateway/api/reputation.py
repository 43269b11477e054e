"""Admin API of source-address health: DNSBL zones (JSON and CSV), results, checks now, warm-up actions.

Handlers are `async (Call) -> Reply` like those of `gateway.api.resources`, which
routes them; they reach the checks through the network policy
(`NetworkPolicy.reputation`, a `gateway.net.reputation.Reputation`).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from gateway.api.resources import ApiError, Call, Reply
from gateway.net import addresses
from gateway.net.dnsbl import MAX_ZONES, CsvError, Zone, parse_csv, parse_zones, zone_host, zones_csv
from gateway.store.base import NotFound, ValidationError

CSV_TYPE = "text/csv; charset=utf-8"


def _zones_body(zones: tuple[Zone, ...]) -> dict[str, Any]:
    return {"zones": [zone.document() for zone in zones]}


class ReputationApi:
    """`/v1/reputation...` and `POST /v1/settings/network/warmup`, admin tokens only."""

    def __init__(self, network: Any) -> None:
        self.network = network  # gateway.net.policy.NetworkPolicy, or None

    def _reputation(self) -> Any:
        reputation = getattr(self.network, "reputation", None)
        if reputation is None:
            raise ApiError(404, "NotFound", "reputation checks are not available here")
        return reputation

    async def get_results(self, call: Call) -> Reply:
        """GET /v1/reputation -> {results: [{address, zone, listed, code, reason, checked}]}"""
        call.require_admin()
        return Reply({"results": [r.document() for r in self._reputation().results()]})

    async def check(self, call: Call) -> Reply:
        """POST /v1/reputation/check {address?, zone?} (omitted: all) -> {results} of this check, when done"""
        call.require_admin()
        reputation = self._reputation()
        body = call.json() if call.body.strip() else {}
        for key in body:
            if key not in ("address", "zone"):
                raise ValidationError(f"unknown field {key} (expected address, zone)")
        address = zone = None
        if body.get("address") is not None:
            try:
                address = addresses.normalize_address(body["address"])
            except ValueError as e:
                raise ValidationError(f"address: {e}") from None
            if address not in await self.network.source_addresses():
                raise NotFound(f"{address} is not a source address of this gateway (in no pool and no "
                               "account's localAddress)")
        if body.get("zone") is not None:
            try:
                zone = zone_host(body["zone"])
            except ValueError as e:
                raise ValidationError(f"zone: {e}") from None
            if zone not in {z.host for z in await reputation.zones()}:
                raise NotFound(f"zone {zone} is not configured")
        results = await reputation.check(address, zone, trigger="api")
        return Reply({"results": [r.document() for r in results]})

    async def get_zones(self, call: Call) -> Reply:
        """GET /v1/reputation/zones -> {zones: [{host, name}]}"""
        call.require_admin()
        return Reply(_zones_body(await self._reputation().zones()))

    async def put_zones(self, call: Call) -> Reply:
        """PUT /v1/reputation/zones {zones: [{host, name?}] | null} (null: gateway.yaml's) -> {zones}"""
        call.require_admin()
        reputation = self._reputation()
        body = call.json()
        for key in body:
            if key != "zones":
                raise ValidationError(f"unknown field {key} (expected zones)")
        if "zones" not in body:
            raise ValidationError("zones is required (a list of {host, name}, or null for gateway.yaml's)")
        zones = None
        if body["zones"] is not None:
            try:
                zones = parse_zones(body["zones"])
            except ValueError as e:
                raise ValidationError(str(e)) from None
        return Reply(_zones_body(await reputation.set_zones(zones, "PUT /v1/reputation/zones")))

    async def get_zones_csv(self, call: Call) -> Reply:
        """GET /v1/reputation/zones.csv -> text/csv `rbl_hostname,rbl_name` with a header line"""
        call.require_admin()
        return Reply(zones_csv(await self._reputation().zones()), content_type=CSV_TYPE,
                     headers={"Content-Disposition": 'attachment; filename="dnsbl-zones.csv"'})

    async def post_zones_csv(self, call: Call) -> Reply:
        """POST /v1/reputation/zones.csv (text/csv; ?replace=true replaces the list) -> {imported, zones}:
        rows add zones or rename those with the same host; any bad row: 400 naming its line, nothing
        imported"""
        call.require_admin()
        reputation = self._reputation()
        replace = call.flag("replace")
        try:
            imported = parse_csv(call.body)
        except CsvError as e:
            raise ValidationError(str(e)) from None
        if replace:
            zones = imported
        else:
            merged = {zone.host: zone for zone in await reputation.zones()}
            merged.update({zone.host: zone for zone in imported})
            zones = tuple(merged.values())
        if len(zones) > MAX_ZONES:
            raise ValidationError(f"{len(zones)} zones after the import: at most {MAX_ZONES}; nothing imported")
        now = await reputation.set_zones(zones, "CSV import" + (" (replace)" if replace else ""))
        return Reply({"imported": len(imported), **_zones_body(now)})

    async def warmup(self, call: Call) -> Reply:
        """POST /v1/settings/network/warmup {address, action: restart|skip} -> {address, started, share}"""
        call.require_admin()
        if self.network is None:
            raise ApiError(404, "NotFound", "network settings are not available here")
        return Reply(await self.network.warmup_action(call.json()))

    def routes(self) -> list[tuple[str, str, Callable[[Call], Awaitable[Reply]], bool]]:
        return [
            ("GET", "/v1/reputation", self.get_results, True),
            ("POST", "/v1/reputation/check", self.check, True),
            ("GET", "/v1/reputation/zones", self.get_zones, True),
            ("PUT", "/v1/reputation/zones", self.put_zones, True),
            ("GET", "/v1/reputation/zones.csv", self.get_zones_csv, True),
            ("POST", "/v1/reputation/zones.csv", self.post_zones_csv, True),
            ("POST", "/v1/settings/network/warmup", self.warmup, True),
        ]
