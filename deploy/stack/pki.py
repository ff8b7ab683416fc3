"""The development PKI ``make run``, the suites and the benchmarks use: made once under a
directory (``.galvani/pki/`` for ``make run``) and reused on every later start.

* ``ca.pem`` / ``ca.key``: the server CA, what every client of the broker and the API trusts
  (run.json's ``ca_file``);
* ``server.pem`` / ``server.key``: the broker's and the API's certificate, for the loopback
  names (services.common.pki.LOOPBACK_NAMES), issued again when it nears its expiry;
* ``device-ca.pem`` / ``device-ca.key``: the device CA, which signs device certificates;
* ``trust/``: the hashed directory (``capath``) the certificate listener verifies devices
  against: the device CA and its revocation lists;
* ``initial.crl``: the device CA's empty revocation list, the broker's ``crlfile``. Mosquitto
  turns OpenSSL's revocation check on only when a ``crlfile`` is set; later lists go into
  ``trust/``, where OpenSSL finds them on the next handshake.
"""

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509

from deploy.stack.errors import SetupError
from services.common import pki

SERVER_CA_NAME: Final = "Galvani development server CA"
DEVICE_CA_NAME: Final = "Galvani development device CA"
# The server certificate is issued again at a start within this long of its expiry, so that a
# long-lived development checkout never meets an expired broker certificate.
SERVER_RENEW_BEFORE: Final = dt.timedelta(days=30)
# Likewise the device CA's newest revocation list (valid pki.CRL_DAYS): OpenSSL refuses every
# device certificate once the list it holds has expired.
CRL_RENEW_BEFORE: Final = dt.timedelta(days=7)


@dataclass(frozen=True)
class DevelopmentPKI:
    """The paths of a development PKI (see the module docstring)."""

    ca_file: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    device_ca_cert: Path
    device_ca_key: Path
    trust_dir: Path
    initial_crl: Path

    @classmethod
    def at(cls, directory: Path) -> "DevelopmentPKI":
        """The paths under ``directory``, whether or not the files exist yet."""
        return cls(
            ca_file=directory / "ca.pem",
            ca_key=directory / "ca.key",
            server_cert=directory / "server.pem",
            server_key=directory / "server.key",
            device_ca_cert=directory / "device-ca.pem",
            device_ca_key=directory / "device-ca.key",
            trust_dir=directory / "trust",
            initial_crl=directory / "initial.crl",
        )

    @classmethod
    def ensure(cls, directory: Path) -> "DevelopmentPKI":
        """The PKI under ``directory``: what exists is reused, what is missing is made, and
        the server certificate is issued again when it expires within SERVER_RENEW_BEFORE."""
        paths = cls.at(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Readable by the broker's user (the suites run it as another user); the keys in it
        # are owner-only files. ``make run``'s data directory keeps others out above this.
        os.chmod(directory, 0o755)  # noqa: S103
        if _needs_server_certificate(paths.server_cert):
            # An operator's own ca.pem and server certificate, without the CA's key, are used
            # as they are: never replaced by a new CA, and not renewed here.
            if paths.ca_file.is_file() and not paths.ca_key.is_file():
                raise SetupError(
                    f"{paths.server_cert} is missing or expires within "
                    f"{SERVER_RENEW_BEFORE.days} days, and {paths.ca_key} is not there to issue "
                    f"another: put a current server certificate and key there (signed by "
                    f"{paths.ca_file}), or remove {paths.ca_file} to use a development CA"
                )
            server_ca = _authority(paths.ca_file, paths.ca_key, SERVER_CA_NAME)
            certificate, key = server_ca.issue_server()
            pki.write_file(paths.server_key, pki.private_pem(key), mode=0o600)
            pki.write_file(paths.server_cert, pki.pem(certificate), mode=0o644)
        device_ca = _authority(paths.device_ca_cert, paths.device_ca_key, DEVICE_CA_NAME)
        trust = pki.TrustDirectory(paths.trust_dir)
        trust.trust(device_ca.certificate)
        newest = trust.newest_revocations(device_ca)
        if (
            newest is None
            or not paths.initial_crl.is_file()
            or newest.next_update_utc is None
            or newest.next_update_utc - dt.datetime.now(dt.UTC) < CRL_RENEW_BEFORE
        ):
            # The same list goes into the trust directory, so that every list published there
            # later is dated after it (publish_revocations dates each list after the
            # directory's newest) and OpenSSL prefers it to the broker's crlfile. A renewed
            # list names what the last one named.
            revoked = (
                [] if newest is None else [(r.serial_number, r.revocation_date_utc) for r in newest]
            )
            published = trust.publish_revocations(device_ca, revoked)
            pki.write_file(paths.initial_crl, published.read_bytes(), mode=0o644)
        return paths

    def device_authority(self) -> pki.Authority:
        """The device CA, which signs device certificates and their revocation lists."""
        return pki.Authority.load(self.device_ca_cert, self.device_ca_key)

    def server_authority(self) -> pki.Authority:
        """The server CA (for tests that issue certificates a client must not trust)."""
        return pki.Authority.load(self.ca_file, self.ca_key)

    def trust(self) -> pki.TrustDirectory:
        """The certificate listener's trust directory."""
        return pki.TrustDirectory(self.trust_dir)

    def key_files(self) -> tuple[Path, ...]:
        """The private keys (owner-only files)."""
        return (self.ca_key, self.server_key, self.device_ca_key)


def _authority(certificate: Path, key: Path, name: str) -> pki.Authority:
    if certificate.is_file() and key.is_file():
        return pki.Authority.load(certificate, key)
    authority = pki.Authority.create(name)
    authority.save(certificate, key)
    return authority


def _needs_server_certificate(path: Path) -> bool:
    if not path.is_file():
        return True
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    remaining = certificate.not_valid_after_utc - dt.datetime.now(dt.UTC)
    return remaining < SERVER_RENEW_BEFORE
