"""Users of a brand and their sessions' totals. Never commits: the request's unit of work owns
the transaction."""

from dataclasses import dataclass
from typing import Final

from psycopg.rows import class_row

from services.api.repository import Repository
from services.api.users.schemas import Stage, User

UPSERT: Final = (
    "INSERT INTO users (brand_id, id, stage, contraindications) VALUES (%s, %s, %s, %s)"
    " ON CONFLICT (brand_id, id) DO UPDATE SET stage = EXCLUDED.stage,"
    " contraindications = EXCLUDED.contraindications, updated_at = now()"
    " RETURNING id, stage, contraindications, updated_at"
)
# One scan of the user's sessions of the last 7 days; output_s is real, and so are its sums.
USAGE: Final = """
SELECT u.stage,
       count(s.session) FILTER (WHERE s.started_at > now() - interval '24 hours') AS day_sessions,
       coalesce(sum(s.output_s) FILTER (WHERE s.started_at > now() - interval '24 hours'), 0)
           AS day_output_s,
       count(s.session) AS week_sessions,
       coalesce(sum(s.output_s), 0) AS week_output_s
FROM users u
LEFT JOIN sessions s ON s.brand_id = u.brand_id AND s.user_id = u.id
                    AND s.started_at > now() - interval '7 days'
WHERE u.brand_id = %s AND u.id = %s
GROUP BY u.stage
"""


@dataclass(frozen=True)
class UsageRow:
    """A user's stage and sessions (count, seconds of output) over 24 hours and 7 days."""

    stage: str
    day_sessions: int
    day_output_s: float
    week_sessions: int
    week_output_s: float


class UserRepository(Repository):
    """Users of a brand, on the read-write unit."""

    def put(self, brand_id: str, user_id: str, stage: Stage, contraindications: list[str]) -> User:
        """Create or update the user."""
        user = self.one(
            UPSERT, [brand_id, user_id, stage.value, contraindications], class_row(User)
        )
        assert user is not None  # an upsert ... RETURNING returns its row
        return user

    def usage(self, brand_id: str, user_id: str) -> UsageRow | None:
        """The user's stage and usage, or None when the brand has no such user."""
        return self.one(USAGE, [brand_id, user_id], class_row(UsageRow))
