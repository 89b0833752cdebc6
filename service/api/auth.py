"""Token authentication of gRPC calls: which role each method needs, and the
interceptor that checks the caller's `authorization: Bearer <token>` against it.

Health and reflection stay open (load balancers and grpcurl need no token). A
method missing from `REQUIRED_ROLE` needs `admin`, so a new RPC is closed until
someone decides otherwise (tests/test_auth.py checks that every RPC of the API
is listed). No token, or one the server does not know, is UNAUTHENTICATED; a
known token without the role is PERMISSION_DENIED, naming the role. The check
runs when gRPC looks the method up, before any request message is read, so a
caller without a token cannot make the server parse an upload.
"""

from __future__ import annotations

import logging

import grpc

from tlserve.service.auth import Role, TokenTable

log = logging.getLogger("tlserve.auth")

OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection")

_READ, _PREDICT, _ADMIN = Role.READ, Role.PREDICT, Role.ADMIN

REQUIRED_ROLE: dict[str, Role] = {
    **{f"tlserve.v1.TLServe/{name}": role for name, role in {
        "GetServerInfo": _READ, "ListBackbones": _READ,
        "GetDataset": _READ, "ListDatasets": _READ,
        "GetJob": _READ, "ListJobs": _READ, "WatchJob": _READ,
        "ListModels": _READ, "GetModel": _READ,
        "Predict": _PREDICT, "PredictStream": _PREDICT,
        "UploadDataset": _ADMIN, "RegisterDataset": _ADMIN, "DeleteDataset": _ADMIN,
        "FineTune": _ADMIN, "CancelJob": _ADMIN,
        "DeleteModel": _ADMIN, "ExportModel": _ADMIN,
        # The trained weights are the user's property: reading them whole is not "read".
        "DownloadModel": _ADMIN,
        "ProfileModel": _ADMIN, "CompareBackbones": _ADMIN,
    }.items()},
    **{f"inference.GRPCInferenceService/{name}": role for name, role in {
        "ServerLive": _READ, "ServerReady": _READ, "ModelReady": _READ,
        "ServerMetadata": _READ, "ModelMetadata": _READ, "ModelConfig": _READ, "ModelStatistics": _READ,
        "ModelInfer": _PREDICT, "ModelStreamInfer": _PREDICT,
    }.items()},
}

AUTHORIZATION_KEY = "authorization"


def required_role(full_method: str) -> Role | None:
    """The role "/pkg.Service/Method" needs; None for the open services."""
    method = full_method.lstrip("/")
    if method.split("/", 1)[0] in OPEN_SERVICES:
        return None
    return REQUIRED_ROLE.get(method, Role.ADMIN)


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call with `code`."""

    async def refuse(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(code, message)

    async def refuse_stream(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises

    streaming = handler.response_streaming
    behavior = refuse_stream if streaming else refuse
    # No deserializer: a refused call never parses its request.
    if handler.request_streaming:
        factory = grpc.stream_stream_rpc_method_handler if streaming else grpc.stream_unary_rpc_method_handler
    else:
        factory = grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
    return factory(behavior, request_deserializer=None, response_serializer=handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks each call's bearer token against `tokens` and the method's role."""

    def __init__(self, tokens: TokenTable) -> None:
        self._tokens = tokens

    def check(self, full_method: str, metadata) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may go on, else the status and message that end it."""
        role = required_role(full_method)
        if role is None:
            return None
        authorization = next((v for k, v in metadata or () if k == AUTHORIZATION_KEY), None)
        if authorization is None:
            return grpc.StatusCode.UNAUTHENTICATED, (
                "this server needs a bearer token: send metadata 'authorization: Bearer <token>' "
                "(tlserve CLI: --token or TLSERVE_TOKEN)")
        principal = self._tokens.principal(authorization if isinstance(authorization, str) else "")
        if principal is None:
            return grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not one this server accepts"
        if not principal.allows(role):
            method = full_method.lstrip("/").rsplit("/", 1)[-1]
            return grpc.StatusCode.PERMISSION_DENIED, (
                f"{method} needs the {role.value} role; the token {principal.name!r} has "
                f"{', '.join(sorted(r.value for r in principal.roles))}")
        return None

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        refused = self.check(handler_call_details.method, handler_call_details.invocation_metadata)
        if refused is None:
            return handler
        log.info("call refused", extra={"fields": {"method": handler_call_details.method.lstrip("/"),
                                                   "code": refused[0].name}})
        return _refusal(handler, *refused)
