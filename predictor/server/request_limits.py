"""The largest request the servers take: every image of a request at its byte limit, in base64.

Why apart from `predictor.server.main`: the REST body limit (`predictor.server.http_limits`),
the `infer` route and the gRPC message limits all derive from the same settings; one formula here
keeps a request that can be valid from being cut by any of them.
"""

from __future__ import annotations

from predictor.settings import Settings

# gRPC messages carry every image of a request; allow that plus room for prompts and framing.
GRPC_MESSAGE_SLACK = 1024 * 1024
GRPC_MAX_MESSAGE = 2**31 - 1


def request_bytes_limit(settings: Settings) -> int:
    """The largest request body that can be valid: every image at its byte limit, base64."""
    return min(
        GRPC_MAX_MESSAGE,
        settings.max_images_per_request * settings.max_image_bytes * 4 // 3 + GRPC_MESSAGE_SLACK,
    )


def raise_grpc_message_limits(kserve_args: object, settings: Settings) -> None:
    """KServe reads its gRPC limits from its import-time args; raise them to fit our images.

    Its default (8 MiB) would refuse a single large photo before the predictor could say why.
    """
    needed = request_bytes_limit(settings)
    for name in ("grpc_max_receive_message_length", "grpc_max_send_message_length"):
        current = getattr(kserve_args, name, 0) or 0
        setattr(kserve_args, name, max(current, needed))
