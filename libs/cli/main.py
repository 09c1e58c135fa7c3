"""The `surveyor` command line (INTERFACES.md): one entry point for people and for process managers."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from libs.common import client, logs, security, stages
from libs.common.errors import PipelineError
from libs.common.pipeline import HandlerConfig, Pipeline, load, parse_override
from libs.simulation import KINDS


def _pipeline(path: str, overrides: list[str]) -> Pipeline:
    """The pipeline file, loaded; its key directory, if it names one, becomes this process's and
    its children's ($SURVEYOR_KEYS), unless that is set already."""
    try:
        pipeline = load(path, overrides)
        keys = pipeline.keys()
    except PipelineError as exc:
        sys.exit(f"surveyor: {exc}")
    if keys is not None:
        os.environ.setdefault(security.ENVIRONMENT, str(keys.directory.resolve()))
    return pipeline


def _handler_endpoint(args: argparse.Namespace) -> str:
    if args.handler:
        return args.handler
    if getattr(args, "pipeline", None):
        return _pipeline(args.pipeline, []).handler.command
    return HandlerConfig().command


def cmd_run(args: argparse.Namespace) -> int:
    from libs.cli import launcher

    out = Path(args.out)
    overrides = list(args.set)
    if args.frames is not None:
        overrides.append(f"simulation.frames={args.frames}")
    if args.rate is not None:
        overrides.append(f"simulation.rate_hz={args.rate}")
    pipeline = _pipeline(args.pipeline, overrides)
    # --out is where every stage with an output_dir writes (the hits and the raw frames of
    # crystallography alike, a collector's result), unless the command line names a stage's own.
    writers = [name for name in pipeline.stages if "output_dir" in type(pipeline.params(name)).model_fields
               and not any(o.startswith(f"stages.{name}.params.output_dir") for o in overrides)]
    if writers:
        overrides += [f"stages.{name}.params.output_dir={json.dumps(str(out))}" for name in writers]
        pipeline = _pipeline(args.pipeline, overrides)
    return launcher.run(pipeline_file=args.pipeline, pipeline=pipeline, overrides=overrides,
                        simulate=args.simulate, scans=args.scans, out=out,
                        summary_path=Path(args.summary) if args.summary else out / "summary.json",
                        web=not args.no_web, web_address=args.web,
                        web_token_file=Path(args.web_token_file) if args.web_token_file else None)


def cmd_handler(args: argparse.Namespace) -> int:
    Handler = stages.handler_class()
    pipeline = _pipeline(args.pipeline, args.set)
    logs.configure("handler")
    try:
        handler = Handler(pipeline, fresh=args.fresh)
    except PipelineError as exc:
        logging.getLogger("services.handler").error("%s", exc)
        sys.exit(f"surveyor handler: {exc}")
    return handler.run()


def cmd_service(args: argparse.Namespace) -> int:
    pipeline = _pipeline(args.pipeline, args.set)
    if args.stage not in pipeline.stages:
        sys.exit(f"surveyor: stage {args.stage!r} is not in {args.pipeline}; stages are {sorted(pipeline.stages)}")
    name = (args.name or os.environ.get("SUPERVISOR_PROCESS_NAME") or os.environ.get("HONCHO_PROCESS_NAME")
            or f"{args.stage}.{os.getpid()}")
    logs.configure(name)
    service = stages.service_class(pipeline.stages[args.stage].service)
    return service(pipeline=pipeline, stage=args.stage, name=name,
                   handler=args.handler or pipeline.handler.command, bind=args.bind).run()


def cmd_ctl(args: argparse.Namespace) -> int:
    try:
        command_args = json.loads(args.args) if args.args else {}
    except ValueError as exc:
        sys.exit(f"surveyor ctl: --args is not JSON: {exc}")
    try:
        reply = client.call(_handler_endpoint(args), args.cmd, command_args, timeout_s=args.timeout)
    except client.NoReply as exc:
        sys.exit(f"surveyor ctl: {exc}")
    print(json.dumps(reply.model_dump(), indent=2))
    return 0 if reply.ok else 1


def _status_endpoint(args: argparse.Namespace) -> str:
    """The status feed that goes with the handler asked for: --status, else what the handler at
    --handler reports (`status_endpoint` in its ping), else its port + 1 (the shipped pipelines'
    layout), else the pipeline's, else the default."""
    if args.status:
        return args.status
    if not args.handler:
        return _pipeline(args.pipeline, []).handler.status if args.pipeline else HandlerConfig().status
    try:
        reported = client.call(args.handler, "ping", timeout_s=min(args.timeout, 2.0)).result.get("status_endpoint")
    except client.NoReply:
        reported = None
    if reported:
        return reported
    address, _, port = args.handler.rpartition(":")
    if not address.startswith("tcp://") or not port.isdigit():
        sys.exit(f"surveyor status: cannot tell the status endpoint of handler {args.handler}; give it with --status")
    guess = f"{address}:{int(port) + 1}"
    print(f"the handler at {args.handler} did not report its status endpoint; following {guess} (its port + 1); "
          f"give --status ENDPOINT if that is not it", file=sys.stderr)
    return guess


def cmd_status(args: argparse.Namespace) -> int:
    from libs.cli import status_view

    if args.watch:
        return status_view.watch(_status_endpoint(args))
    endpoint = _handler_endpoint(args)
    try:
        reply = client.call(endpoint, "status", timeout_s=args.timeout)
    except client.NoReply as exc:
        sys.exit(f"surveyor status: {exc}")
    status_view.show(reply.result)
    return 0


def _find_log(service: str) -> Path:
    """SERVICE's log in the log directory (supervisord, honcho, a service started by hand), else
    in the newest `surveyor run` directory under it; a unique prefix will do (`worker` = worker.1)."""
    root = logs.log_dir()
    newest = logs.newest_run(root)
    for directory in (root, newest):
        if directory is None:
            continue
        path = directory / f"{service}.log"
        matches = [path] if path.exists() else sorted(directory.glob(f"{service}*.log"))
        if len(matches) == 1:
            return matches[0]
    where = newest or root
    known = ", ".join(p.stem for p in sorted(where.glob("*.log"))) or "none"
    sys.exit(f"surveyor logs: no log of {service} in {root}" + (f" nor in the newest run, {newest}" if newest else "")
             + f"; logs in {where}: {known}")


def cmd_logs(args: argparse.Namespace) -> int:
    path = _find_log(args.service)
    with open(path, encoding="utf-8", errors="replace") as handle:
        sys.stdout.write(handle.read())
        sys.stdout.flush()
        while args.follow:
            line = handle.readline()
            if line:
                sys.stdout.write(line)
                sys.stdout.flush()
            else:
                time.sleep(0.2)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from libs.cli import simulate

    try:
        params = dict(parse_override(text) for text in args.param)
    except PipelineError as exc:
        sys.exit(f"surveyor simulate: {exc}")
    return simulate.run(kind=args.kind, protocol=args.protocol, bind=args.bind, frames=args.frames,
                        rate=args.rate, truth=args.truth, compression=args.compression,
                        series=args.series_id or str(int(time.time())), scan_id=args.scan_id, params=params,
                        handler=args.handler, wait_peer_s=args.wait_peer, linger_s=args.linger)


def cmd_process(args: argparse.Namespace) -> int:
    from libs.cli import process

    try:
        params = [parse_override(text) for text in args.param]
    except PipelineError as exc:
        sys.exit(f"surveyor process: {exc}")
    return process.run(spec=args.processing, source=args.source, params=params, pipeline=args.pipeline, out=args.out,
                       stage=args.stage, protocol=args.protocol, dataset=args.dataset)


def cmd_web(args: argparse.Namespace) -> int:
    from libs.web import access, server

    pipeline_file = args.pipeline or args.pipeline_file
    pipeline = _pipeline(pipeline_file, args.set) if pipeline_file else None
    handler = args.handler or (pipeline.handler.command if pipeline else HandlerConfig().command)
    if args.status:
        status = args.status
    elif args.handler:
        status = _status_endpoint(args)  # what that handler reports, else its port + 1
    else:
        status = pipeline.handler.status if pipeline else HandlerConfig().status
    logs.configure("web")
    try:
        return server.serve(status=status, handler=handler, address=args.bind, pipeline=pipeline,
                            token_file=Path(args.token_file) if args.token_file else None)
    except access.AccessError as exc:
        logging.getLogger("libs.web").error("%s", exc)
        sys.exit(f"surveyor web: {exc}")


def cmd_supervisor_conf(args: argparse.Namespace) -> int:
    from libs.cli.supervisor_conf import render

    web = None
    if not args.no_web:
        from libs.web.access import AccessError, choose, parse_address

        try:
            if args.web is not None:
                parse_address(args.web)  # taken now or not: supervisord may start it later
                web = args.web
            else:
                host, port = choose(None)  # 127.0.0.1:8080, or a port free now when that is taken
                web = f"{host}:{port}"
        except AccessError as exc:
            sys.exit(f"surveyor supervisor-conf: {exc}")
    pipeline = _pipeline(args.pipeline, args.set)
    chosen = args.stages.split(",") if args.stages else list(pipeline.stages)
    if unknown := sorted(set(chosen) - set(pipeline.stages)):
        sys.exit(f"surveyor supervisor-conf: no stage {unknown} in {args.pipeline}; stages are {sorted(pipeline.stages)}")
    print(render(args.pipeline, pipeline, log_dir=Path(args.log_dir).resolve(), web=None if args.handler else web,
                 stages=chosen, handler=args.handler, bind=args.bind,
                 keys=Path(args.host_keys).resolve() if args.host_keys else None))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    try:
        if args.action == "init":
            made = security.create(args.directory, handler_key=args.handler_key, name=args.name)
            print(f"made {made}: copy {made / 'server.key'} to the other hosts as their handler.key (if the handler "
                  f"runs here) and let each host's client.key in with `surveyor keys allow`")
        elif args.action == "allow":
            if not args.file:
                sys.exit("surveyor keys allow: name the public key FILE to let in")
            security.allow(args.directory, args.file, name=args.name, operator=args.operator)
        for role, name, key in security.listing(args.directory):
            print(f"{role:9} {name:20} {key}")
    except (OSError, ValueError) as exc:
        sys.exit(f"surveyor keys: {exc}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="surveyor", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)

    def keys_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--keys", metavar="DIR", help="CURVE key directory to connect with (default: $SURVEYOR_KEYS, "
                       "else the pipeline's [security] keys)")

    def overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key of the pipeline file by its dotted path (value read as TOML)")

    p = commands.add_parser("run", help="start the handler and every stage on this machine",
                            description="Start the handler and every stage on this machine. Logs go to "
                                        "$SURVEYOR_LOG_DIR (default ./logs)/PIPELINE-YYYYmmdd-HHMMSS. Exit code 1 "
                                        "when a scan lost frames (each loss is printed with its reason) or the "
                                        "pipeline could not run; 130 when interrupted; else 0.")
    p.add_argument("pipeline")
    p.add_argument("--simulate", action="store_true", help="run one scan from the built-in simulated detector")
    p.add_argument("--frames", type=int, help="frames in the simulated scan")
    p.add_argument("--rate", type=float, help="simulated frame rate in Hz (0 = as fast as the pipeline takes)")
    p.add_argument("--scans", type=int,
                   help="exit after this many finished scans; aborted ones do not count (default: until interrupted)")
    p.add_argument("--out", default="out", help="output directory of every writer stage (default ./out)")
    p.add_argument("--summary", help="summary JSON path (default OUT/summary.json)")
    p.add_argument("--web", metavar="ADDR:PORT",
                   help="where the web front-end listens (default 127.0.0.1:8080, or a free port when taken)")
    p.add_argument("--no-web", action="store_true", help="no web front-end")
    p.add_argument("--web-token-file", metavar="FILE",
                   help="the web front-end's command token, kept in FILE (made if missing; default: a new one in "
                        "the run's log directory)")
    overrides(p)
    p.set_defaults(func=cmd_run)

    p = commands.add_parser("handler", help="the handler alone")
    p.add_argument("pipeline")
    p.add_argument("--fresh", action="store_true",
                   help="a new run: close a scan the journal has as running instead of carrying it on")
    overrides(p)
    p.set_defaults(func=cmd_handler)

    p = commands.add_parser("service", help="one process of one stage")
    p.add_argument("stage")
    p.add_argument("--pipeline", required=True)
    p.add_argument("--handler", help="handler command endpoint (default: the pipeline's)")
    p.add_argument("--name", help="process name for logs and status (default: from supervisord/honcho, or STAGE.PID)")
    p.add_argument("--bind", metavar="ADDRESS", help="the address of this host that the process binds and advertises "
                   "its ports on (default: the pipeline's handler.data_host)")
    overrides(p)
    p.set_defaults(func=cmd_service)

    for name, func, text in (("ctl", cmd_ctl, "send one command to the handler"),
                             ("status", cmd_status, "services, health, rates, queues, current scan")):
        p = commands.add_parser(name, help=text)
        keys_option(p)
        p.add_argument("--handler", help="handler command endpoint (default tcp://127.0.0.1:5550)")
        p.add_argument("--pipeline", help="take the handler's endpoints from this pipeline file")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the reply")
        p.set_defaults(func=func)
        if name == "ctl":
            p.add_argument("cmd")
            p.add_argument("--args", help="command arguments as a JSON object")
        else:
            p.add_argument("--watch", action="store_true",
                           help="follow the live status feed: --status, else the one the --handler reports "
                                "(or its port + 1), else the pipeline's")
            p.add_argument("--status", help="status feed endpoint to follow with --watch")

    p = commands.add_parser("logs", help="print (or follow) one service's log",
                            description="Print (or follow) one service's log: $SURVEYOR_LOG_DIR/SERVICE.log "
                                        "(default ./logs), else the newest `surveyor run` directory's.")
    p.add_argument("service")
    p.add_argument("-f", "--follow", action="store_true")
    p.set_defaults(func=cmd_logs)

    p = commands.add_parser("simulate", help="a virtual detector streaming a simulated scan")
    p.add_argument("kind", choices=KINDS,
                   help="what to simulate: ptycho (a ptychography scan), sx (serial crystallography frames), "
                        "synthetic (numbered frames)")
    p.add_argument("--protocol", choices=["stream1", "stream2", "stins"], default="stream1")
    p.add_argument("--bind", default="tcp://127.0.0.1:9999", help="PUSH endpoint to bind (default: Eiger's port)")
    p.add_argument("--frames", type=int, help="frames in the series (default: the simulation's own)")
    p.add_argument("--rate", type=float, default=0.0, help="frames per second (0 = as fast as taken)")
    p.add_argument("--truth", help="write the ground truth to this HDF5 file")
    p.add_argument("--compression", choices=["bslz4", "lz4", "none"], default="bslz4",
                   help="pixel encoding, with the 12-byte HDF5 framing for bslz4 (default)")
    p.add_argument("--series-id", help="detector series id (default: the Unix time)")
    p.add_argument("--handler", help="send the scan description to this handler before streaming")
    p.add_argument("--scan-id", help="scan id in that description (default: the simulation's)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a simulation parameter, value as TOML (e.g. size=64, raw_shape=[320, 320])")
    p.add_argument("--wait-peer", type=float, default=30.0, help="seconds to wait for a receiver to connect")
    p.add_argument("--linger", type=float, default=30.0, help="seconds to wait for queued messages at exit")
    p.set_defaults(func=cmd_simulate)

    p = commands.add_parser("process", help="a Processing class over a file, offline (OM's Processing Protocol)",
                            description="Run a Processing class (libs/common/processing.py) over an HDF5/CXI file or "
                                        "a recorded detector stream in one process, as processing node 1 and "
                                        "collecting node 0, and write its result as the collecting node does: "
                                        "OUT/SCAN_ID.STAGE.h5. Exit code 1 when a frame failed in the class or the "
                                        "run could not start.")
    p.add_argument("processing", metavar="CLASS", help="'package.module:Class' or 'path/to/file.py:Class'")
    p.add_argument("source", help="an HDF5/CXI file (e.g. out/SCAN_raw.cxi) or a recorded stream (*.msgpack.gz)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a key of the class's parameters (value read as TOML; dotted keys for nested tables)")
    p.add_argument("--pipeline", help="start from the parameters of this pipeline's processing_node stage")
    p.add_argument("--out", default="out", help="directory of the result file (default ./out)")
    p.add_argument("--stage", default="offline", help="the STAGE in the result file's name (default offline)")
    p.add_argument("--protocol", choices=["stream1", "stream2", "stins"],
                   help="a recorded stream's protocol (default: from its file name)")
    p.add_argument("--dataset", default="", help="the frame stack's path in an HDF5 file (default: look for it)")
    p.set_defaults(func=cmd_process)

    p = commands.add_parser("web", help="the web front-end: the HTTP API and the live page",
                            description="The web front-end: follows the handler's status port, serves the page "
                                        "at / and the HTTP API under /api (OpenAPI at /docs), and sends commands "
                                        "(start_scan, abort, configure; they need the token) to the handler. "
                                        "Endpoints from the pipeline file, or --handler/--status.")
    p.add_argument("pipeline_file", nargs="?", metavar="PIPELINE", help="the pipeline file (or --pipeline)")
    keys_option(p)
    p.add_argument("--pipeline", help="take the handler's endpoints and the stages from this pipeline file")
    p.add_argument("--handler", help="handler command endpoint (default: the pipeline's)")
    p.add_argument("--status", help="handler status endpoint (default: the pipeline's, else what --handler reports)")
    p.add_argument("--bind", "--listen", dest="bind", default="127.0.0.1:8080", metavar="ADDR:PORT",
                   help="where to listen (default 127.0.0.1:8080: this host only)")
    p.add_argument("--token-file", help="read the command token from this file (created with a new token if "
                                        "missing); default: a new token, printed at start")
    p.set_defaults(func=cmd_web, timeout=2.0)
    overrides(p)

    p = commands.add_parser("keys", help="CURVE keys: make a host's key directory, let clients in, list them",
                            description="CURVE keys (libs/common/security.py). `init DIR`: this host's server "
                                        "and client pairs, the handler's public key, this host let in. `allow DIR "
                                        "FILE`: let in the client whose public key FILE holds (another host's "
                                        "client.key; --operator: it may also steer a service directly). `list DIR`.")
    p.add_argument("action", choices=["init", "allow", "list"])
    p.add_argument("directory", metavar="DIR")
    p.add_argument("file", nargs="?", metavar="FILE", help="allow: the client's public key file")
    p.add_argument("--handler-key", metavar="FILE",
                   help="init: the handler host's server.key (default: this host runs the handler)")
    p.add_argument("--name", help="init: this host's name in the allow-list (default: its hostname); "
                                  "allow: the key's name (default: the file's)")
    p.add_argument("--operator", action="store_true", help="allow: an operator's key")
    p.set_defaults(func=cmd_keys)

    p = commands.add_parser("supervisor-conf", help="a supervisord configuration for a pipeline",
                            description="A supervisord configuration for a pipeline: every process on this host, "
                                        "or, with --handler, this host's share of a pipeline whose handler runs "
                                        "elsewhere.")
    p.add_argument("pipeline")
    p.add_argument("--log-dir", default="logs")
    p.add_argument("--stages", help="only these stages' programs (comma-separated; default: all)")
    p.add_argument("--handler", help="the handler runs at this endpoint on another host: no handler or web program "
                                     "here, and the services connect there")
    p.add_argument("--bind", metavar="ADDRESS", help="the address of this host its services bind and advertise")
    p.add_argument("--keys", metavar="DIR", dest="host_keys",
                   help="this host's CURVE key directory (SURVEYOR_KEYS of every program)")
    web = p.add_mutually_exclusive_group()
    web.add_argument("--web", metavar="ADDR:PORT",
                     help="where the web front-end program listens (default 127.0.0.1:8080, or a port free now "
                          "when that is taken)")
    web.add_argument("--no-web", action="store_true", help="no web front-end program")
    overrides(p)
    p.set_defaults(func=cmd_supervisor_conf)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "keys", None):
        os.environ[security.ENVIRONMENT] = str(Path(args.keys).resolve())
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
