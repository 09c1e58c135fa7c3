"""From a stage's `service` name to its code: the one module of `libs` that imports `services`.

A stage service is a package `services/<service>/` with two modules: `params.py`, its `Params`
model (light: pydantic and libs.common, so any process can validate every stage's parameters),
and `service.py`, its runtime class `Service` (the science, imported only by that stage's own
processes). The handler, `services/handler/`, is not a stage service.

    params_model("writer")    # services.writer.params.Params
    service_class("writer")   # services.writer.service.Service, whose Params is the same class
    handler_class()           # services.handler.service.Handler

An unknown service is a LookupError (the pipeline's loader turns it into the operator's message).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from pydantic import BaseModel


def _module(service: str, module: str) -> ModuleType:
    if not service.isidentifier() or service == "handler":
        raise LookupError(service)
    name = f"services.{service}.{module}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # Only the module asked for (or its package) missing means "no such service"; anything
        # else missing is a broken install and surfaces as it is.
        if exc.name and (exc.name == name or name.startswith(f"{exc.name}.")) and exc.name != "services":
            raise LookupError(service) from None
        raise


def _get(module: ModuleType, attribute: str, service: str) -> Any:
    value = getattr(module, attribute, None)
    if not isinstance(value, type):
        raise LookupError(service)
    return value


def params_model(service: str) -> type[BaseModel]:
    """The parameter model of a stage service (`services/<service>/params.py`, `Params`)."""
    return _get(_module(service, "params"), "Params", service)


def service_class(service: str) -> type:
    """The runtime class of a stage service (`services/<service>/service.py`, `Service`)."""
    return _get(_module(service, "service"), "Service", service)


def handler_class() -> type:
    """The handler's class (`services/handler/service.py`, `Handler`)."""
    from services.handler.service import Handler

    return Handler
