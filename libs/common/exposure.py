"""What a pipeline binds beyond loopback with no CURVE on it: whoever reaches the host can steer
the scan or read its data there, so `surveyor run` warns at start and names every such port, and a
process that binds one logs it. With the pipeline's keys (security.py) only the ports whose peers
speak no CURVE are named: a hit server serving indexamajig, the re-publication for dranspose."""

from __future__ import annotations

from libs.common.pipeline import Pipeline

LOOPBACK_NAMES = ("localhost", "::1", "lo")


def loopback_host(host: str) -> bool:
    host = host.strip("[]")
    return host in LOOPBACK_NAMES or host.startswith("127.")


def beyond_loopback(endpoint: str) -> bool:
    """A TCP endpoint that other hosts can reach (`*`, an interface's address or name)."""
    if not endpoint.startswith("tcp://"):
        return False
    return not loopback_host(endpoint.removeprefix("tcp://").rpartition(":")[0])


def exposed(pipeline: Pipeline, web: tuple[str, int] | None = None) -> list[str]:
    """Each port the pipeline (and its web front-end at `web`) binds beyond loopback with no
    CURVE, in words."""
    handler = pipeline.handler
    curve = pipeline.keys() is not None
    found = [] if curve else [f"the handler's {what} port {endpoint}" for what, endpoint in
                              (("command", handler.command), ("status", handler.status)) if beyond_loopback(endpoint)]
    if not loopback_host(handler.data_host) and not curve:
        found.append(f"every service's command and data ports (data_host {handler.data_host})")
    for name, stage in pipeline.stages.items():
        for key in ("endpoint", "republish"):
            endpoint = stage.params.get(key)
            protected = curve and key == "endpoint" and getattr(pipeline.params(name), "curve", False)
            if isinstance(endpoint, str) and beyond_loopback(endpoint) and not protected:
                found.append(f"stage {name}'s {key} {endpoint}")
    if web is not None and not loopback_host(web[0]):
        found.append(f"the web front-end at {web[0]}:{web[1]} (its commands need the token)")
    return found


def warning(pipeline: Pipeline, web: tuple[str, int] | None = None) -> str | None:
    """The operator's warning for what `exposed` finds, or None when everything is loopback."""
    found = exposed(pipeline, web)
    if not found:
        return None
    return ("this pipeline listens beyond loopback with no authentication: anyone who reaches this host can "
            "send commands or read data on " + "; ".join(found) + ". Name a key directory ([security] keys, "
            "`surveyor keys init DIR`) for CURVE, keep these ports behind a firewall or an SSH tunnel, "
            "or bind them to 127.0.0.1")
