"""Device certificates at the API's boundary: the device CA, refusals as problems, and what
decommissioning a certificate device does at the broker once its revocation has committed."""

import logging
from collections.abc import Callable

from services.api.problems import ProblemError
from services.api.settings import ApiSettings
from services.common import pki, provisioning
from services.common.broker_certificates import end_device_session
from services.common.db import Conn

log = logging.getLogger(__name__)


def device_authority(settings: ApiSettings) -> pki.Authority:
    """Galvani's device CA, read from its files on each use (a few hundred bytes; a CA
    replaced on disk is used at once); 503 when this installation has none."""
    certificate, key = settings.device_ca_files()
    try:
        return pki.Authority.load(certificate, key)
    except (OSError, ValueError) as exc:
        log.warning("device CA unavailable (%s, %s): %s", certificate, key, exc)
        raise ProblemError(
            503,
            "certificates-unavailable",
            "Certificates unavailable",
            "this installation cannot issue or revoke device certificates just now (its "
            "device CA cannot be read); retry later, or provision the device with a password",
        ) from None


def refused(error: provisioning.CertificateRefusedError) -> ProblemError:
    """The 422 for a CSR or factory certificate Galvani will not sign, naming the field."""
    field = f"body.{error.field}"
    return ProblemError(
        422,
        "invalid-certificate-request",
        "Certificate not issued",
        f"{field}: {error}",
        errors=[{"field": field, "message": str(error)}],
    )


def publish_revocations(settings: ApiSettings, authority: pki.Authority) -> Callable[[Conn], None]:
    """What follows the commit of a certificate device's revocation, first: the device CA's
    new revocation list in the broker's trust directory, so the next handshake with a revoked
    certificate fails."""

    def publish(conn: Conn) -> None:
        provisioning.publish_revocations(
            conn, authority, pki.TrustDirectory(settings.trust_directory())
        )

    return publish


def end_session(settings: ApiSettings, device_id: str) -> Callable[[Conn], None]:
    """Then: the end of the device's live session (a revocation list is checked at
    handshakes only, the NATS cluster's auth callout at logins only) by session takeover on
    the service listener, in MQTT 3.1.1 on a broker that speaks only that; 503 when no broker
    node can be reached (the revocation stands, and a repeated DELETE tries again)."""

    def end(_: Conn) -> None:
        # Any node will do (a cluster's client-id registry spans its nodes): the first that
        # answers, in the order of the settings.
        ended = any(
            end_device_session(
                host,
                port,
                settings.mqtt_username,
                settings.mqtt_password.get_secret_value(),
                settings.mqtt_tls_context(),
                device_id,
                settings.session_end_timeout_s,
                protocol=settings.mqtt_protocol(),
            )
            for host, port in settings.mqtt_addresses()
        )
        if not ended:
            raise ProblemError(
                503,
                "session-not-ended",
                "Session not ended",
                f"device {device_id!r} is decommissioned (it cannot connect again), but the "
                "broker could not be reached to end the connection it has; repeat the DELETE "
                "to end it",
                headers={"Retry-After": "1"},
            )

    return end
