"""Refusing query parameters an operation does not take.

A misspelt filter (``?devce=x``) used to be ignored, so the client got every row as if it had
filtered. Every operation in the OpenAPI document now answers 422 naming each query parameter
it does not declare, as request bodies refuse unknown fields (``schemas.body_config``).
"""

from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute

from services.api.problems import ProblemError

# By id, with the route itself: APIRoute is not hashable, and an id alone could be reused by
# a route of a later app (tests build many).
_declared: dict[int, tuple[APIRoute, frozenset[str]]] = {}


def declared_query_names(route: APIRoute) -> frozenset[str]:
    """The query parameters ``route`` takes (its own and its dependencies'), by wire name."""
    known = _declared.get(id(route))
    if known is not None and known[0] is route:
        return known[1]
    found: set[str] = set()
    dependants = [route.dependant]
    while dependants:
        dependant = dependants.pop()
        found.update(param.alias for param in dependant.query_params)
        dependants.extend(dependant.dependencies)
    names = frozenset(found)
    _declared[id(route)] = (route, names)
    return names


async def refuse_unknown_query(request: Request) -> None:
    """A dependency of every operation: 422 if the query string names a parameter the
    operation does not declare."""
    route: Any = request.scope.get("route")
    if not isinstance(route, APIRoute) or not route.include_in_schema or not request.query_params:
        return
    unknown = sorted(set(request.query_params.keys()) - declared_query_names(route))
    if unknown:
        listed = ", ".join(unknown)
        accepted = ", ".join(sorted(declared_query_names(route))) or "none"
        raise ProblemError(
            422,
            "unknown-parameter",
            "Unknown query parameter",
            f"{listed}: not a parameter of this operation (it takes: {accepted})",
            errors=[{"field": f"query.{name}", "message": "unknown parameter"} for name in unknown],
        )
