"""The local tracking server's authentication: MLflow's basic auth, aliases reserved to admins.

MLflow's basic-auth app lets whoever may edit a registered model move its aliases (setting
one asks only for EDIT), and EDIT is what registering a new version asks for too. So a
plain account that can register versions could also point ``champion`` anywhere and skip
``models promote``'s gate. This function, named as ``authorization_function`` in the
server's auth config, authenticates exactly as MLflow's own does and then refuses the
alias routes (set and delete, at every path MLflow serves them) to any account that is
not an admin; the account ``models promote`` and ``models rollback`` use is the admin.

It runs inside the MLflow server process only.
"""

from __future__ import annotations

from flask import Response, make_response, request
from mlflow.server import auth as mlflow_auth

# MLflow's own route table: every (path, method) whose validator guards an alias move.
_ALIAS_ROUTES = frozenset(
    route
    for route, validator in mlflow_auth.BEFORE_REQUEST_VALIDATORS.items()
    if validator
    in (
        mlflow_auth.validate_can_set_model_or_prompt_version_alias,
        mlflow_auth.validate_can_delete_model_or_prompt_version_alias,
    )
)


def authenticate_reserving_aliases():
    """MLflow's basic-auth check; on an alias route, a 403 for every account but an admin."""
    authorization = mlflow_auth.authenticate_request_basic_auth()
    if isinstance(authorization, Response) or (request.path, request.method) not in _ALIAS_ROUTES:
        return authorization
    if mlflow_auth.store.get_user(authorization.username).is_admin:
        return authorization
    response = make_response(
        "Permission denied: model aliases are moved only by `anchorless models promote` and "
        "`anchorless models rollback` (the registry's admin account)"
    )
    response.status_code = 403
    return response
