"""Changes to the registry other than uploads: create and delete models and versions (MLflow
API; a version's delete is GraphQL only) and delete one package file (Maintainer)."""

from __future__ import annotations

from mlregfs.errors import BadRequest, Forbidden, NotFound, ProtocolError
from mlregfs.registry import validate
from mlregfs.registry.gitlab.api import Api
from mlregfs.registry.gitlab.decode import dict_at, timestamp
from mlregfs.registry.gitlab.listing import checked_model
from mlregfs.registry.types import Model, ModelVersion, RemoteFile


class Admin:
    """create_model, create_version, delete_model, delete_version, delete_file over one Api."""

    def __init__(self, api: Api) -> None:
        self._api = api

    async def delete_file(self, file: RemoteFile) -> None:
        """DELETE /projects/:id/packages/:pkg/package_files/:file (Maintainer; 204)."""
        url = self._api.project_url(f"packages/{file.package_id}/package_files/{file.file_id}")
        await self._api.json("delete_file", "DELETE", url)

    async def create_model(self, name: str) -> Model:
        """MLflow registered-models/create."""
        reply = await self._api.mlflow_json(
            "create_model", "POST", "registered-models/create", body={"name": name}
        )
        return checked_model(dict_at(reply.data, "registered_model"))

    async def create_version(self, model: str, version: str) -> ModelVersion:
        """MLflow model-versions/create; the `gitlab.version` tag sets the semver."""
        body = {"name": model, "tags": [{"key": "gitlab.version", "value": version}]}
        reply = await self._api.mlflow_json(
            "create_version", "POST", "model-versions/create", body=body
        )
        mv = dict_at(reply.data, "model_version")
        aliases = mv.get("aliases") or [version]
        try:
            mv_id = validate.ident(mv.get("version"), "model version id")
            semver = validate.semver(aliases[0] if isinstance(aliases, list) else None)
        except validate.Invalid as exc:
            raise ProtocolError(f"model-versions/create: unusable answer: {exc}") from None
        return ModelVersion(model, semver, mv_id, timestamp(mv.get("creation_timestamp")))

    async def delete_version(self, version: ModelVersion) -> None:
        """GraphQL mlModelVersionDelete: GitLab has no REST route for it."""
        if version.id is None:
            raise BadRequest(f"cannot delete {version.model}/{version.version}: its id is unknown")
        gid = f"gid://gitlab/Ml::ModelVersion/{version.id}"
        await self._graphql("mlModelVersionDelete", gid, f"{version.model}/{version.version}")

    async def delete_model(self, name: str) -> None:
        """MLflow registered-models/delete."""
        await self._api.mlflow_json(
            "delete_model", "DELETE", "registered-models/delete", params={"name": name}
        )

    async def _graphql(self, mutation: str, gid: str, what: str) -> None:
        """One mutation. GraphQL answers 200 with its errors in the body: a missing payload
        is a refusal, an error naming "not found" a missing object, any other a bad request."""
        url = self._api.api_base.rsplit("/v4", 1)[0] + "/graphql"
        query = (
            f"mutation($id: {'MlModelVersionID' if 'Version' in mutation else 'MlModelID'}!)"
            f" {{ {mutation}(input: {{id: $id}}) {{ errors }} }}"
        )
        reply = await self._api.json(
            "graphql", "POST", url, route="graphql", body={"query": query, "variables": {"id": gid}}
        )
        data = reply.data
        if not isinstance(data, dict):
            raise ProtocolError(f"GraphQL {mutation}: unexpected answer")
        payload = (data.get("data") or {}).get(mutation)
        if payload is None:
            messages = "; ".join(str(e.get("message", e)) for e in data.get("errors") or [])
            raise Forbidden(f"GraphQL {mutation} on {what}: {self._api.scrub(messages)}")
        errors = payload.get("errors") or []
        if errors:
            text = "; ".join(map(str, errors))
            cls = NotFound if "not found" in text.lower() else BadRequest
            raise cls(f"GraphQL {mutation} on {what}: {self._api.scrub(text)}")
