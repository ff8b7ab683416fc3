"""Certificate devices for tests: enrolled from their own CSR, as the API enrols them."""

from dataclasses import dataclass
from pathlib import Path

import psycopg

from services.common import pki, provisioning


@dataclass(frozen=True)
class EnrolledDevice:
    """A certificate device in the test's database and the files it connects with."""

    device_id: str
    serial: int
    cert_file: Path
    key_file: Path


def enrol_certificate_device(
    database_url: str, authority: pki.Authority, directory: Path, device_id: str
) -> EnrolledDevice:
    """Provision ``device_id`` (brand ``acme``) with a certificate ``authority`` signs for a
    new key, and write the certificate and key under ``directory``."""
    key = pki.new_device_key()
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO brands (id, name) VALUES ('acme', 'acme') ON CONFLICT DO NOTHING")
        issued = provisioning.provision_certificate_device(
            conn,
            authority,
            provisioning.CertificateRequest(csr=pki.device_csr(key, device_id)),
            device_id=device_id,
            brand_id="acme",
            model="m1",
        )
    cert_file = directory / f"{device_id}.pem"
    key_file = directory / f"{device_id}.key"
    pki.write_file(cert_file, issued.pem.encode(), mode=0o644)
    pki.write_file(key_file, pki.private_pem(key), mode=0o600)
    return EnrolledDevice(device_id, issued.serial, cert_file, key_file)
