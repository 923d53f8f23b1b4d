"""GraphQL: the model and version delete mutations GitLab's clients send."""

from __future__ import annotations

import json
import re

from starlette.responses import Response

from mlregfs.server.auth import DEVELOPER
from mlregfs.server.context import Ctx
from mlregfs.server.http import ApiError, json_response

# The two mutations mlregfs needs (GitLab has no REST route for deleting a model version).
# Not a GraphQL engine: the mutation name and its `id` argument are read from the document
# or its variables, and the answer has GitLab's shape.
_GQL_MUTATION = re.compile(r"\b(mlModelVersionDelete|mlModelDelete|mlModelDestroy)\s*\(")
_GQL_ID = re.compile(r'\bid\s*:\s*(?:"([^"]+)"|\$(\w+))')
_GQL_GID = re.compile(r"\Agid://gitlab/Ml::(ModelVersion|Model)/(\d+)\Z")
GQL_NO_ACCESS = (
    "The resource that you are attempting to access does not exist or you don't have"
    " permission to perform this action"
)


async def graphql(ctx: Ctx) -> Response:
    """POST /api/graphql: mlModelVersionDelete / mlModelDelete (alias mlModelDestroy)."""
    if ctx.request.method != "POST":
        return json_response({"errors": [{"message": "Only POST is supported here"}]}, 405)
    try:
        ctx.principal()
    except ApiError:
        return json_response({"errors": [{"message": "Invalid token"}]}, 401)
    try:
        body = json.loads(await ctx.request.body())
        query, variables = body.get("query", ""), body.get("variables") or {}
    except (ValueError, AttributeError):
        return json_response({"errors": [{"message": "Invalid JSON body"}]}, 400)
    m = _GQL_MUTATION.search(query)
    idm = _GQL_ID.search(query[m.end() :]) if m else None
    if m is None or idm is None:
        return json_response({"errors": [{"message": "Unsupported query for this server"}]})
    field = m.group(1)
    gid = idm.group(1) or str(variables.get(idm.group(2), ""))
    kind = "ModelVersion" if field == "mlModelVersionDelete" else "Model"
    gm = _GQL_GID.match(gid)
    if gm is None or gm.group(1) != kind:
        msg = f'"{gid}" does not represent an instance of Ml::{kind}'
        return json_response({"errors": [{"message": msg}]})

    def denied() -> Response:
        err = {"message": GQL_NO_ACCESS, "path": [field]}
        return json_response({"errors": [err], "data": {field: None}})

    obj_id = int(gm.group(2))
    store = ctx.store
    row = store.version_by_id(obj_id) if kind == "ModelVersion" else store.model_by_id(obj_id)
    if row is None:
        # resolve: `return { errors: ['Model version not found'] }` (also for models)
        payload_key = "modelVersion" if kind == "ModelVersion" else "model"
        what = "Model version" if kind == "ModelVersion" else "Model"
        return json_response(
            {"data": {field: {payload_key: None, "errors": [f"{what} not found"]}}}
        )
    project = ctx.store.project(int(row["project_id"]))
    if project is None or ctx.principal() is None or ctx.level(project) < DEVELOPER:
        return denied()  # authorize :write_model_registry
    if "api" not in ctx.principal().scopes:  # type: ignore[union-attr]
        return denied()
    gid_out = f"gid://gitlab/Ml::{kind}/{obj_id}"
    if kind == "ModelVersion":
        ctx.store.delete_version(int(project["id"]), obj_id)
        return json_response({"data": {field: {"modelVersion": {"id": gid_out}, "errors": []}}})
    ctx.store.delete_model(int(project["id"]), obj_id)
    return json_response({"data": {field: {"model": {"id": gid_out}, "errors": []}}})
