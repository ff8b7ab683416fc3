"""Renewal of the device CA's revocation list before it expires.

A revocation list is valid ``pki.CRL_DAYS`` (30) days. Past its nextUpdate OpenSSL refuses
every certificate the device CA issued ("CRL has expired"), so every certificate device would
be shut out. A list is written at decommissioning and at ``make run``'s start only, so the
process that holds the device CA's key, the API, looks at the newest list in the broker's
trust directory every ``crl_renew_interval_s`` and, when it expires within
``crl_renew_before_s``, publishes the list again: every revoked certificate in the database,
through ``provisioning.publish_revocations`` like a decommission. The broker reads it on the
next handshake (no reload).

Each API process runs the check. The renewal re-reads the newest list after taking the
revocation lists' advisory lock, so a list another process has just renewed is left alone
rather than published twice (each list stays in the broker's memory until it restarts).
"""

import asyncio
import datetime as dt
import logging
from pathlib import Path

import psycopg
from cryptography import x509
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from services.api.database import psycopg_connection
from services.api.metrics import DEVICE_CRL_NEXT_UPDATE
from services.api.settings import ApiSettings
from services.common import pki, provisioning

log = logging.getLogger(__name__)

# The lock provisioning.publish_revocations takes (transaction-scoped, re-entrant): taken first
# here so that the check of the newest list and the publication are one step across processes.
_REVOCATIONS_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('galvani-device-crl', 0))"


def newest_revocation_list(
    trust_dir: Path, authority: pki.Authority
) -> x509.CertificateRevocationList | None:
    """The authority's highest-numbered list in ``trust_dir`` (the one OpenSSL uses), or None."""
    return pki.TrustDirectory(trust_dir).newest_revocations(authority)


def _expires(crl: x509.CertificateRevocationList | None) -> dt.datetime | None:
    return None if crl is None else crl.next_update_utc


def _due(expires: dt.datetime | None, before: dt.timedelta) -> bool:
    return expires is None or expires - dt.datetime.now(dt.UTC) < before


def renew_if_due(settings: ApiSettings, engine: Engine) -> Path | None:
    """Publish the device CA's revocation list again if the newest expires within
    ``settings.crl_renew_before_s`` (or there is none); the file written, or None. Nothing
    when the installation has no device CA. Sets the next-update gauge either way."""
    certificate, key = settings.device_ca_files()
    if not (certificate.is_file() and key.is_file()):
        return None
    authority = pki.Authority.load(certificate, key)
    trust_dir = settings.trust_directory()
    before = dt.timedelta(seconds=settings.crl_renew_before_s)
    expires = _expires(newest_revocation_list(trust_dir, authority))
    if expires is not None:
        DEVICE_CRL_NEXT_UPDATE.set(expires.timestamp())
    if not _due(expires, before):
        return None
    with engine.begin() as connection:
        conn = psycopg_connection(connection)
        conn.execute(_REVOCATIONS_LOCK)
        expires = _expires(newest_revocation_list(trust_dir, authority))
        if not _due(expires, before):
            return None  # another API process renewed it meanwhile
        path = provisioning.publish_revocations(conn, authority, pki.TrustDirectory(trust_dir))
    renewed = _expires(x509.load_pem_x509_crl(path.read_bytes()))
    if renewed is not None:
        DEVICE_CRL_NEXT_UPDATE.set(renewed.timestamp())
    log.info(
        "device revocation list renewed: %s (was expiring %s, now %s)",
        path.name,
        "never written" if expires is None else expires.isoformat(),
        "unknown" if renewed is None else renewed.isoformat(),
    )
    return path


async def renew_periodically(settings: ApiSettings, engine: Engine) -> None:
    """Check now, then every ``crl_renew_interval_s``, until cancelled (the lifespan's end).
    A failed check (database down, unreadable file) is logged and tried at the next one."""
    while True:
        try:
            await asyncio.to_thread(renew_if_due, settings, engine)
        except (OSError, ValueError, psycopg.Error, SQLAlchemyError):
            log.exception("could not renew the device revocation list; trying again later")
        await asyncio.sleep(settings.crl_renew_interval_s)
