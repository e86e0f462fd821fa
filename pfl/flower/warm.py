"""A warm ClientApp process for one SuperNode: it serves every message the node receives, in one process.

Flower's own `flwr-clientapp` serves exactly one message and exits, whichever isolation mode the SuperNode
runs in; with pfl that meant importing torch and Lightning and rebuilding the data set for every message
(~20 s per round for four tiny clients). A SuperNode started with `--isolation process` leaves starting
ClientApp processes to whoever serves its runtime API (host:port of `flower-supernode`); this module is
that server's client: it loops on Flower's own runtime calls (AcquireTask, then the same pull / load / call
/ push sequence as `flwr-clientapp`) and keeps the Python process, so pfl's per-process cache in
`pfl.flower.app` (data, partition, modules, runner) lives from the first message to the last.

    python -m pfl.flower.warm --runtime-api-address 127.0.0.1:PORT [--parent-pid SUPERNODE_PID]
                              [--superexec-auth-secret-file SECRET]

A SuperNode started with `--superexec-auth-secret-file SECRET` (pfl's deployments do unless `--insecure`)
hands a task only to a process that signs its AcquireTask calls with that secret (Flower's SuperExec HMAC
headers); every later call of a task carries the task's token, which only the acquirer knows.

It uses `flwr.supernode.runtime.run_clientapp`'s helpers (pull_task_input, push_message, push_task_output),
which are Flower internals: pfl pins flwr < 1.43 and the deployment test runs this path end to end.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time

POLL_SECONDS = 0.05  # between AcquireTask calls while the node has no message for this process

log = logging.getLogger("pfl.flower.warm")


def _client(address: str, interceptors: list):
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


def serve_one(address: str, token: str, load_app) -> str:
    """Serve the task `token`: pull its message, run pfl's ClientApp on it, push the reply. Returns the
    status Flower records ('completed' or 'failed'); a ClientApp exception becomes an error reply."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.cli.install import install_from_fab
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    client = _client(address, [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                               RuntimeTokenHttpInterceptor(token)])
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))  # long trainings must not look dead
    heartbeat.start()
    started = time.perf_counter()
    message = context = reply = None
    status, details = SubStatus.FAILED, "the task input could not be pulled"
    try:
        message, context, run, fab = pull_task_input(client)
        install_from_fab(fab.content, skip_prompt=True)  # unpacks once per FAB hash, then a no-op
        reply = load_app(run.fab_id, run.fab_version, fab.hash_str)(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:
        details = f"{type(exc)}:<'{exc}'>"
        log.exception("the ClientApp raised")
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client=client, context=context, sub_status=status, details=details)
        finally:
            heartbeat.stop()
            client.close()
    kind = message.metadata.message_type if message is not None else "?"
    log.info("pid %d served a %s message in %.3f s: %s", os.getpid(), kind, time.perf_counter() - started, status)
    return status


def retry_object_pulls_sooner(initial: float = 0.05, cap: float = 1.0) -> None:
    """A SuperNode creates a message's task before it has pulled the message's objects from the SuperLink, so
    a ClientApp that acquires the task at once (this one polls every 0.05 s) often finds them missing and
    waits out Flower's first retry back-off, 1 s (then 2, 4, ...): measured, about 1 s of a 1.2 s message.
    Retrying after `initial` seconds, doubling up to `cap`, serves the message as soon as its objects are
    there. Patches the name `pull_task_input` calls (flwr 1.42 internals, pinned like the rest of this
    module)."""
    import functools

    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode.runtime import run_clientapp

    run_clientapp.pull_and_inflate_object_from_tree = functools.partial(
        inflatable_utils.pull_and_inflate_object_from_tree, initial_backoff=initial, backoff_cap=cap)


def serve(address: str, secret: bytes | None = None) -> None:
    """Serve the SuperNode at `address` until this process is stopped; `secret`: the SuperNode's SuperExec
    secret (its `--superexec-auth-secret-file`), which signs AcquireTask."""
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor

    retry_object_pulls_sooner()
    # Loaded apps are cached by Python's module cache: `pfl.flower.app` is imported once per process.
    load_app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret,
                                                         protected_methods={"/flwr.proto.Runtime/AcquireTask"}))
    executor = _client(address, interceptors)
    while True:
        task = executor.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if not (task.HasField("task") and task.token):
            time.sleep(POLL_SECONDS)
            continue
        serve_one(address, task.token, load_app)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="host:port of the SuperNode's runtime API")
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when this process (the SuperNode) ends")
    parser.add_argument("--superexec-auth-secret-file", default=None,
                        help="the SuperNode's SuperExec secret file (read as raw bytes)")
    args = parser.parse_args(argv)
    secret = None
    if args.superexec_auth_secret_file:
        from flwr.supercore.auth import load_superexec_auth_secret

        secret = load_superexec_auth_secret(args.superexec_auth_secret_file)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.parent_pid:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    with contextlib.suppress(KeyboardInterrupt):  # the parent monitor's SIGINT, or a stop
        serve(args.runtime_api_address, secret)


if __name__ == "__main__":
    main()
