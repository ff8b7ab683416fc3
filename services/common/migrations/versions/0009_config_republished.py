"""When a mode table was last published again, apart from when it was first published.

Rules publish a device's newest unanswered table again once the device has been back online
a while (a broker killed -9 can forget a retained table it had not saved). ``published_at``
stays the first publication, which the ``config_unacked`` alert measures the device's online
time from and the push history shows; ``republished_at`` is the latest publication, which the
next republish is judged against.
"""

from services.common.migrations.ddl import execute

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    execute("ALTER TABLE config_pushes ADD COLUMN republished_at timestamptz")


def downgrade() -> None:
    execute("ALTER TABLE config_pushes DROP COLUMN republished_at")
