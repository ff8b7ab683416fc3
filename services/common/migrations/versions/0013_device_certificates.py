"""Per-device certificates, and the factory CAs brands register to vouch for their devices' keys.

* ``devices.auth``: how the device authenticates to the broker, ``password`` (the device
  listener, ``credential_hash``) or ``certificate`` (the certificate listener, a certificate
  Galvani's device CA signed; such a device never has a password hash).
* ``brand_device_authorities``: a brand's factory CA, registered so that a device provisioned
  with a factory certificate chained to it gets a Galvani certificate for the same key. The
  broker never trusts these CAs (it maps a certificate to a device by its CN alone, so a
  brand's CA trusted there could name another brand's devices). A removed authority keeps its
  row (``removed_at``), so the certificates it vouched for still say which it was; one active
  row per (brand, fingerprint).
* ``device_certificates``: every certificate Galvani's device CA issued to a device: its
  serial (what a revocation list names; unique, being one CA's), SHA-256 fingerprint,
  validity, when it was revoked, and the brand authority that vouched for its key (NULL: the
  device sent a CSR).
"""

from services.common.migrations.ddl import execute

revision = "0013"
down_revision = "0012"


def upgrade() -> None:
    execute("""
    ALTER TABLE devices ADD COLUMN auth text NOT NULL DEFAULT 'password'
        CONSTRAINT devices_auth_check CHECK (auth IN ('password', 'certificate'))""")
    execute("""
    ALTER TABLE devices ADD CONSTRAINT devices_certificate_no_password
        CHECK (auth = 'password' OR credential_hash IS NULL)""")
    execute("""
    CREATE TABLE brand_device_authorities (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        brand_id text NOT NULL REFERENCES brands (id),
        subject text NOT NULL CHECK (length(subject) BETWEEN 1 AND 1024),
        fingerprint text NOT NULL CHECK (fingerprint ~ '^[0-9a-f]{64}$'),
        certificate text NOT NULL CHECK (length(certificate) BETWEEN 1 AND 65536),
        not_after timestamptz NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        removed_at timestamptz
    )""")
    execute("""
    CREATE UNIQUE INDEX brand_device_authorities_fingerprint_key
        ON brand_device_authorities (brand_id, fingerprint) WHERE removed_at IS NULL""")
    execute("""
    CREATE TABLE device_certificates (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        device_id text NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
        serial numeric(49, 0) NOT NULL CHECK (serial > 0),
        fingerprint text NOT NULL CHECK (fingerprint ~ '^[0-9a-f]{64}$'),
        not_before timestamptz NOT NULL,
        not_after timestamptz NOT NULL,
        issued_at timestamptz NOT NULL DEFAULT now(),
        revoked_at timestamptz,
        authority_id bigint REFERENCES brand_device_authorities (id),
        CONSTRAINT device_certificates_serial_key UNIQUE (serial),
        CONSTRAINT device_certificates_fingerprint_key UNIQUE (fingerprint),
        CHECK (not_after > not_before)
    )""")
    execute(
        "CREATE INDEX device_certificates_device_idx"
        " ON device_certificates (device_id, not_after DESC)"
    )
    # The revocation list names every revoked certificate; the expiry sweep reads the
    # unrevoked ones by not_after.
    execute(
        "CREATE INDEX device_certificates_revoked_idx ON device_certificates (revoked_at)"
        " WHERE revoked_at IS NOT NULL"
    )
    execute(
        "CREATE INDEX device_certificates_not_after_idx ON device_certificates (not_after)"
        " WHERE revoked_at IS NULL"
    )


def downgrade() -> None:
    execute("DROP TABLE device_certificates")
    execute("DROP TABLE brand_device_authorities")
    execute("ALTER TABLE devices DROP CONSTRAINT devices_certificate_no_password")
    execute("ALTER TABLE devices DROP COLUMN auth")
