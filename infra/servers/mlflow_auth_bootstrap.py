"""Create morer1's MLflow accounts and permissions on a tracking server that runs the basic-auth app.

Idempotent: run it after every `docker compose up` (the `mlflow-auth-init` service does) or by hand after a
password change in `.env`. Everything comes from the environment; nothing is printed but names.

    MLFLOW_TRACKING_URI                        the server, e.g. http://127.0.0.1:5000
    MLFLOW_AUTH_ADMIN_USERNAME / _PASSWORD     the admin account the server created on its first start
    MORER1_PIPELINE_USERNAME / _PASSWORD       account of the pipeline (stages, `morer1 register`)
    MORER1_PROMOTER_USERNAME / _PASSWORD       account of the promotion flow (`morer1 promote`)
    MORER1_READERS                             optional read-only accounts, "name:password name:password ..."
    MORER1_EXPERIMENT                          experiment the pipeline logs to (default morer1)
    MORER1_MODEL                               served registered model, the one with `champion` (default morer1)
    MORER1_CANDIDATE_MODEL                     registered model the pipeline registers into, with `challenger`
                                               (default: MORER1_MODEL + "-candidates")

What each account may do (the server's default_permission is READ, so every account reads everything):

    pipeline   EDIT on the experiment (create runs, log, upload artifacts and logged models)
               EDIT on the candidate model (create versions, tag them, set `challenger`)
               READ on the served model: it cannot create versions there nor set or move `champion`
    promoter   EDIT on the served model (copy the winning candidate in, set/move `champion`)
               EDIT on the candidate model (write the `promotion.*` decision tags on the challenger version)
    readers    nothing granted: READ everywhere through default_permission

Why two registered models: in MLflow 3.17's basic-auth app, creating a model version
(`_authorize_create_version`) and setting an alias (`validate_can_set_model_or_prompt_version_alias`) both
require `update` (EDIT) on the registered model, so no grant on one model lets an account register versions
without also letting it move `champion`. Only deleting an alias needs MANAGE. The experiment and both models
are created here, as the admin: MLflow gives the creator of an experiment or a registered model MANAGE on it,
and no one but the admin should hold that.

Only the standard library: it speaks the server's REST API (the calls `mlflow.server.get_app_client("basic-auth")`
and `MlflowClient` make), so it runs in any Python 3.9+ and starts in a fraction of a second, where importing
`mlflow.server` takes ~10 s.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

EDIT = "EDIT"


class ApiError(Exception):
    def __init__(self, status: int, error_code: str, message: str):
        super().__init__(f"HTTP {status} {error_code}: {message}")
        self.status, self.error_code = status, error_code


class Api:
    """The tracking server's REST API, as one account (HTTP basic auth)."""

    def __init__(self, uri: str, username: str, password: str):
        self.uri = uri.rstrip("/")
        self.auth = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()

    def __call__(self, method: str, path: str, body: dict | None = None, query: dict | None = None) -> dict:
        url = self.uri + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method,
                                         headers={"Authorization": self.auth, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                error = json.loads(text)
            except ValueError:
                error = {}
            raise ApiError(exc.code, error.get("error_code", ""), error.get("message", text[:300])) from None
        return json.loads(text) if text.strip() else {}


def _need(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        sys.exit(f"mlflow_auth_bootstrap: set {name}")
    return value


def _accounts() -> list[tuple[str, str, str]]:
    """(role, username, password) of every account to have, from the environment."""
    accounts = [("pipeline", _need("MORER1_PIPELINE_USERNAME"), _need("MORER1_PIPELINE_PASSWORD")),
                ("promoter", _need("MORER1_PROMOTER_USERNAME"), _need("MORER1_PROMOTER_PASSWORD"))]
    for entry in os.environ.get("MORER1_READERS", "").replace(",", " ").split():
        name, sep, password = entry.partition(":")
        if not (name and sep and password):
            sys.exit("mlflow_auth_bootstrap: MORER1_READERS must be 'name:password' pairs separated by spaces")
        accounts.append(("reader", name, password))
    names = [name for _, name, _ in accounts]
    if len(set(names)) != len(names):
        sys.exit(f"mlflow_auth_bootstrap: account names must differ, got {names}")
    if _need("MLFLOW_AUTH_ADMIN_USERNAME") in names:
        sys.exit("mlflow_auth_bootstrap: the admin account cannot also be a morer1 account")
    short = [name for _, name, password in accounts if len(password) < 12]
    if short:
        sys.exit(f"mlflow_auth_bootstrap: MLflow wants passwords of 12+ characters; too short for {short}")
    return accounts


def _ensure_user(api: Api, username: str, password: str) -> str:
    try:
        api("POST", "/api/2.0/mlflow/users/create", {"username": username, "password": password})
        return "created"
    except ApiError as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # The environment is the truth: a changed password in .env takes effect by rerunning this.
    api("PATCH", "/api/2.0/mlflow/users/update-password", {"username": username, "password": password})
    return "exists, password set"


def _ensure_experiment(api: Api, name: str) -> str:
    try:
        return api("GET", "/api/2.0/mlflow/experiments/get-by-name", query={"experiment_name": name})[
            "experiment"]["experiment_id"]
    except ApiError as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    return api("POST", "/api/2.0/mlflow/experiments/create", {"name": name})["experiment_id"]


def _ensure_model(api: Api, name: str) -> None:
    try:
        api("POST", "/api/2.0/mlflow/registered-models/create", {"name": name})
    except ApiError as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _set_grant(api: Api, username: str, resource_type: str, resource_id: str, permission: str | None) -> None:
    """Make `permission` the user's only explicit grant on the resource; None leaves default_permission (READ).

    Any earlier grant goes first (e.g. the MANAGE MLflow gave a user who created the resource): the auth API
    refuses to grant over an existing grant.
    """
    key = {"username": username, "resource_type": resource_type, "resource_id": resource_id}
    try:
        api("POST", "/api/3.0/mlflow/users/permissions/revoke", key)
    except ApiError as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    if permission is not None:
        api("POST", "/api/3.0/mlflow/users/permissions/grant", {**key, "permission": permission})


def main() -> None:
    accounts = _accounts()
    api = Api(_need("MLFLOW_TRACKING_URI"), _need("MLFLOW_AUTH_ADMIN_USERNAME"), _need("MLFLOW_AUTH_ADMIN_PASSWORD"))
    experiment_name = os.environ.get("MORER1_EXPERIMENT") or "morer1"
    model = os.environ.get("MORER1_MODEL") or "morer1"
    candidates = os.environ.get("MORER1_CANDIDATE_MODEL") or f"{model}-candidates"
    if candidates == model:
        sys.exit("mlflow_auth_bootstrap: MORER1_CANDIDATE_MODEL must differ from MORER1_MODEL (see the docstring)")

    for role, username, password in accounts:
        print(f"user {username} ({role}): {_ensure_user(api, username, password)}")
    experiment_id = _ensure_experiment(api, experiment_name)
    _ensure_model(api, model)
    _ensure_model(api, candidates)

    pipeline = next(name for role, name, _ in accounts if role == "pipeline")
    promoter = next(name for role, name, _ in accounts if role == "promoter")
    grants = {
        pipeline: [("experiment", experiment_id, EDIT), ("registered_model", candidates, EDIT),
                   ("registered_model", model, None)],
        promoter: [("experiment", experiment_id, None), ("registered_model", model, EDIT),
                   ("registered_model", candidates, EDIT)],
    }
    for _, name, _ in accounts:
        grants.setdefault(name, [("experiment", experiment_id, None), ("registered_model", model, None),
                                 ("registered_model", candidates, None)])
    for username, rows in grants.items():
        for resource_type, resource_id, permission in rows:
            _set_grant(api, username, resource_type, resource_id, permission)
            shown = experiment_name if resource_type == "experiment" else resource_id
            print(f"  {username}: {resource_type} {shown} -> {permission or 'default (READ)'}")
    print(f"done: experiment {experiment_name} (id {experiment_id}), served model {model}, candidates {candidates}")


if __name__ == "__main__":
    try:
        main()
    except (ApiError, urllib.error.URLError) as exc:
        sys.exit(f"mlflow_auth_bootstrap: {exc}")
