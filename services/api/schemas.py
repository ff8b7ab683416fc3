"""What every request body of the API shares."""

from pydantic import ConfigDict
from pydantic.config import JsonDict


def body_config(*examples: JsonDict) -> ConfigDict:
    """A request body's model config: an unknown field is refused (a misspelt name is a 422,
    never silently ignored), and ``examples`` are shown in the OpenAPI document."""
    if not examples:
        return ConfigDict(extra="forbid")
    return ConfigDict(extra="forbid", json_schema_extra={"examples": list(examples)})
