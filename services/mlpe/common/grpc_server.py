"""What every mlpe gRPC service shares: health and reflection on start, a client-side
wait until a server says SERVING, and the client channel to `mlpe control`."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection


async def start_server(address: str, service: str, add_servicer: Callable[[grpc.aio.Server],
                                                                         None],
                       credentials: grpc.ServerCredentials | None = None,
                       ) -> tuple[grpc.aio.Server, int]:
    """A started grpc.aio server with `add_servicer`'s service, the standard health service
    (SERVING) and reflection; returns it and its bound port (TLS when `credentials`)."""
    server = grpc.aio.server()
    add_servicer(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (service, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = (server.add_secure_port(address, credentials) if credentials else
            server.add_insecure_port(address))
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    for name in ("", service):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port


def control_channel(settings) -> grpc.Channel:
    """A channel to mlpe control at Settings.control_address (TLS with control_tls_ca)."""
    if settings.control_tls_ca is not None:
        creds = grpc.ssl_channel_credentials(settings.control_tls_ca.read_bytes())
        return grpc.secure_channel(settings.control_address, creds)
    return grpc.insecure_channel(settings.control_address)


def wait_serving(channel: grpc.Channel, proc: subprocess.Popen, what: str,
                 timeout: float = 60.0, log: Callable[[], str] = lambda: "") -> None:
    """Until the server behind `channel` says SERVING; RuntimeError if `proc` exits or the
    time runs out (with `log()` appended)."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}):\n{log()}")
        with contextlib.suppress(grpc.RpcError):
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not healthy after {timeout:.0f} s:\n{log()}")
        time.sleep(0.2)
